// csrc/simt/symbols.cpp — what the simulator knows of the kernels it runs, from the module's own
// ELF symbol table: their names (for error messages) and the static shared memory each declares
// (for the launch limit, docs/simt.md "Launch"); and the short source paths errors cite.
#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>

#include "internal.h"

namespace simt::detail {

// The kernel's address is looked up in the module's own ELF symbol table (_sim is linked without
// stripping): hidden template instantiations are not in the dynamic symbol table. The same table
// gives the kernel's static shared memory: `__shared__` is `thread_local`, so a `__shared__ T s[N]`
// declared in kernel K is a TLS object named _ZZ<K's encoding>E1s (Itanium ABI local name) of
// st_size sizeof(T) * N.
static std::string demangle(const char* s) {
  int st = 0;
  char* d = abi::__cxa_demangle(s, nullptr, nullptr, &st);
  std::string r = (st == 0 && d) ? d : s;
  std::free(d);
  return r;
}

namespace {
// One module's .symtab, read once: function symbols by offset, TLS objects local to a function
// (_ZZ...) sorted by name.
struct ModuleSymbols {
  std::map<uintptr_t, std::string> funcs;
  std::vector<std::pair<std::string, size_t>> local_tls;
};
ModuleSymbols read_symbols(const char* path) {
  ModuleSymbols m;
  int fd = open(path, O_RDONLY);
  struct stat sb {};
  if (fd >= 0 && fstat(fd, &sb) == 0 && size_t(sb.st_size) > sizeof(Elf64_Ehdr)) {
    void* map = mmap(nullptr, size_t(sb.st_size), PROT_READ, MAP_PRIVATE, fd, 0);
    if (map != MAP_FAILED) {
      const char* base = static_cast<const char*>(map);
      const size_t size = size_t(sb.st_size);
      const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(base);
      if (std::memcmp(eh->e_ident, ELFMAG, SELFMAG) == 0 && eh->e_ident[EI_CLASS] == ELFCLASS64 &&
          eh->e_shoff + size_t(eh->e_shnum) * sizeof(Elf64_Shdr) <= size) {
        const auto* sh = reinterpret_cast<const Elf64_Shdr*>(base + eh->e_shoff);
        for (int i = 0; i < eh->e_shnum; ++i) {
          if (sh[i].sh_type != SHT_SYMTAB || sh[i].sh_link >= eh->e_shnum) continue;
          const Elf64_Shdr& strsec = sh[sh[i].sh_link];
          if (sh[i].sh_offset + sh[i].sh_size > size || strsec.sh_offset + strsec.sh_size > size) continue;
          const auto* syms = reinterpret_cast<const Elf64_Sym*>(base + sh[i].sh_offset);
          const char* strs = base + strsec.sh_offset;
          const size_t n = sh[i].sh_size / sizeof(Elf64_Sym);
          for (size_t k = 0; k < n; ++k) {
            if (syms[k].st_name >= strsec.sh_size) continue;
            const char* nm = strs + syms[k].st_name;
            const int type = ELF64_ST_TYPE(syms[k].st_info);
            if (type == STT_FUNC && syms[k].st_value) m.funcs.emplace(uintptr_t(syms[k].st_value), nm);
            else if (type == STT_TLS && std::strncmp(nm, "_ZZ", 3) == 0) m.local_tls.emplace_back(nm, size_t(syms[k].st_size));
          }
        }
      }
      munmap(map, size);
    }
  }
  if (fd >= 0) close(fd);
  std::sort(m.local_tls.begin(), m.local_tls.end());
  m.local_tls.erase(std::unique(m.local_tls.begin(), m.local_tls.end()), m.local_tls.end());
  return m;
}
// Bytes of static shared memory declared in the body of the function `mangled` (_Z<encoding>):
// its TLS statics are _ZZ<encoding>E<name>. Statics of lambdas or local classes inside it start
// with _ZZZ, those of other functions differ before the E.
size_t static_smem_of(const ModuleSymbols& m, const std::string& mangled) {
  if (mangled.compare(0, 2, "_Z") != 0) return 0;
  const std::string prefix = "_ZZ" + mangled.substr(2) + "E";
  size_t bytes = 0;
  for (auto t = std::lower_bound(m.local_tls.begin(), m.local_tls.end(), std::make_pair(prefix, size_t(0)));
       t != m.local_tls.end() && t->first.compare(0, prefix.size(), prefix) == 0; ++t)
    bytes += t->second;
  return bytes;
}
}  // namespace

std::mutex g_symbols_mutex;

const KernelInfo& kernel_info(const void* addr) {
  std::mutex& mu = g_symbols_mutex;
  static std::map<const void*, KernelInfo> cache;
  static std::map<std::string, ModuleSymbols> modules;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(addr);
  if (it != cache.end()) return it->second;
  char buf[64];
  std::snprintf(buf, sizeof buf, "kernel@%p", addr);
  KernelInfo info{buf, 0};
  Dl_info dl{};
  if (dladdr(addr, &dl) && dl.dli_fname) {
    auto mod = modules.find(dl.dli_fname);
    if (mod == modules.end()) mod = modules.emplace(dl.dli_fname, read_symbols(dl.dli_fname)).first;
    std::string mangled;
    if (dl.dli_sname && dl.dli_saddr == addr) {
      mangled = dl.dli_sname;
    } else {
      auto f = mod->second.funcs.find(uintptr_t(addr) - uintptr_t(dl.dli_fbase));
      if (f != mod->second.funcs.end()) mangled = f->second;
    }
    if (!mangled.empty()) {
      info.name = demangle(mangled.c_str());
      info.static_smem = static_smem_of(mod->second, mangled);
    }
  }
  return cache.emplace(addr, std::move(info)).first->second;
}
std::string kernel_name(const void* addr) { return kernel_info(addr).name; }

// Every function of this module with static shared memory in its body: (demangled name, bytes).
std::vector<std::pair<std::string, size_t>> static_smem_table() {
  std::vector<std::pair<std::string, size_t>> out;
  Dl_info dl{};
  if (!dladdr(reinterpret_cast<const void*>(&static_smem_table), &dl) || !dl.dli_fname) return out;
  const ModuleSymbols m = read_symbols(dl.dli_fname);
  for (const auto& f : m.funcs)
    if (const size_t bytes = static_smem_of(m, f.second)) out.emplace_back(demangle(f.second.c_str()), bytes);
  return out;
}

std::string short_path(const char* file) {
  if (!file) return "?";
  std::string f = file;
  for (const char* root : {"/csrc/", "/include/", "/tests/"}) {
    size_t p = f.rfind(root);
    if (p != std::string::npos) return f.substr(p + 1);
  }
  size_t s = f.rfind('/');
  return s == std::string::npos ? f : f.substr(s + 1);
}

}  // namespace simt::detail
