// csrc/simt/warp.cpp — warp collectives of the simt simulator: shfl / vote / reduce / syncwarp,
// mma.sync m16n8k16 (f16 / bf16), m16n8k32 (s8) and ldmatrix, with their PTX ISA semantics, and the deadlock report.
//
// Every lane of a collective publishes a Collective record (on its own fiber stack) and parks;
// the lane that completes the group (all lanes of `mask` that exist in the block are parked with
// the same mask and operation) computes every lane's result and releases the others.
#include <algorithm>
#include <cstdio>
#include <vector>

#include "internal.h"

namespace simt::detail {

std::string op_name(Op op) {
  switch (op) {
    case Op::shfl_idx: return "__shfl_sync";
    case Op::shfl_up: return "__shfl_up_sync";
    case Op::shfl_down: return "__shfl_down_sync";
    case Op::shfl_bfly: return "__shfl_xor_sync";
    case Op::ballot: return "__ballot_sync";
    case Op::any: return "__any_sync";
    case Op::all: return "__all_sync";
    case Op::reduce_add: return "__reduce_add_sync";
    case Op::syncwarp: return "__syncwarp";
    case Op::mma_f16: return "mma_m16n8k16<f16>";
    case Op::mma_bf16: return "mma_m16n8k16<bf16>";
    case Op::mma_s8: return "mma_m16n8k32<s8>";
    case Op::ldmatrix: return "ldmatrix";
    case Op::ldmatrix_trans: return "ldmatrix.trans";
  }
  return "?";
}

static bool is_aligned_op(Op op) {
  return op == Op::mma_f16 || op == Op::mma_bf16 || op == Op::mma_s8 || op == Op::ldmatrix || op == Op::ldmatrix_trans;
}
static bool is_shfl(Op op) {
  return op == Op::shfl_idx || op == Op::shfl_up || op == Op::shfl_down || op == Op::shfl_bfly;
}

static std::string hex(unsigned m) {
  char b[16];
  std::snprintf(b, sizeof b, "0x%08x", m);
  return b;
}
// "0-15,17" style list of the set bits of a lane mask
static std::string lanes(unsigned m) {
  std::string s;
  for (int i = 0; i < 32;) {
    if (!(m >> i & 1)) { ++i; continue; }
    int j = i;
    while (j + 1 < 32 && (m >> (j + 1) & 1)) ++j;
    if (!s.empty()) s += ",";
    s += std::to_string(i);
    if (j > i) s += "-" + std::to_string(j);
    i = j + 1;
  }
  return s.empty() ? "none" : s;
}
static std::string site(const Fiber& f) { return short_path(f.file) + ":" + std::to_string(f.line); }

// ---------------------------------------------------------------------------- semantics
static float f16_bits_to_f32(uint32_t h) { return f16_to_f32(uint16_t(h)); }
static float bf16_bits_to_f32(uint32_t h) { return bf16_to_f32(uint16_t(h)); }

void compute_collective(Worker& w, unsigned warp, unsigned group) {
  Collective* c[32] = {};
  for (unsigned l = 0; l < 32; ++l)
    if (group >> l & 1) c[l] = fiber_at(w, warp * 32 + l).coll;
  unsigned first = unsigned(__builtin_ctz(group));
  const Op op = c[first]->op;
  switch (op) {
    case Op::shfl_idx:
    case Op::shfl_up:
    case Op::shfl_down:
    case Op::shfl_bfly:
      // PTX ISA, "Data Movement and Conversion Instructions: shfl.sync", Semantics.
      for (int l = 0; l < 32; ++l) {
        if (!c[l]) continue;
        const int bval = int(c[l]->in[4] & 31u), cval = int(c[l]->in[5] & 31u), seg = int((c[l]->in[5] >> 8) & 31u);
        const int max_lane = (l & seg) | (cval & ~seg), min_lane = l & seg;
        int j = l;
        bool p = false;
        switch (op) {
          case Op::shfl_up: j = l - bval; p = j >= max_lane; break;
          case Op::shfl_down: j = l + bval; p = j <= max_lane; break;
          case Op::shfl_bfly: j = l ^ bval; p = j <= max_lane; break;
          default: j = min_lane | (bval & ~seg); p = j <= max_lane; break;
        }
        if (!p) j = l;
        for (int k = 0; k < c[l]->nwords; ++k)
          // Sourcing from a lane outside the mask is undefined: the simulator returns all ones
          // (NaN as float) so that such a read is visible rather than plausible.
          c[l]->out[k] = (j >= 0 && j < 32 && c[j]) ? c[j]->in[k] : 0xffffffffu;
      }
      break;
    case Op::ballot:
    case Op::any:
    case Op::all: {
      unsigned bits = 0;
      for (int l = 0; l < 32; ++l)
        if (c[l] && c[l]->in[0]) bits |= 1u << l;
      const uint32_t r = op == Op::ballot ? bits : op == Op::any ? uint32_t(bits != 0) : uint32_t(bits == group);
      for (int l = 0; l < 32; ++l)
        if (c[l]) c[l]->out[0] = r;
      break;
    }
    case Op::reduce_add: {
      uint32_t sum = 0;
      for (int l = 0; l < 32; ++l)
        if (c[l]) sum += c[l]->in[0];
      for (int l = 0; l < 32; ++l)
        if (c[l]) c[l]->out[0] = sum;
      break;
    }
    case Op::syncwarp: break;
    case Op::mma_f16:
    case Op::mma_bf16: {
      // Fragment layout: PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type".
      float (*cvt)(uint32_t) = op == Op::mma_f16 ? f16_bits_to_f32 : bf16_bits_to_f32;
      double A[16][16], B[16][8], C[16][8];
      for (int l = 0; l < 32; ++l) {
        const int g = l >> 2, t = l & 3;
        const uint32_t* in = c[l]->in;
        for (int r = 0; r < 4; ++r) {  // a[r]: rows g / g+8, cols 2t / 2t+8
          const int row = g + ((r & 1) ? 8 : 0), col = 2 * t + ((r & 2) ? 8 : 0);
          A[row][col] = cvt(in[r] & 0xffffu);
          A[row][col + 1] = cvt(in[r] >> 16);
        }
        for (int r = 0; r < 2; ++r) {  // b[r]: rows 2t (+8), col g
          const int row = 2 * t + (r ? 8 : 0);
          B[row][g] = cvt(in[4 + r] & 0xffffu);
          B[row + 1][g] = cvt(in[4 + r] >> 16);
        }
        for (int i = 0; i < 4; ++i) {
          float f;
          std::memcpy(&f, &in[6 + i], 4);
          C[g + (i >= 2 ? 8 : 0)][2 * t + (i & 1)] = f;
        }
      }
      for (int l = 0; l < 32; ++l) {
        const int g = l >> 2, t = l & 3;
        for (int i = 0; i < 4; ++i) {
          const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
          double acc = C[row][col];
          for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
          const float f = float(acc);
          std::memcpy(&c[l]->out[i], &f, 4);
        }
      }
      break;
    }
    case Op::mma_s8: {
      // PTX ISA, "Matrix Fragments for mma.m16n8k32" (figures mma-16832-A-i8, mma-16832-B-i8,
      // mma-16832-C): a[r] holds A[g + 8 (r & 1)][4t + 16 (r >> 1) + i], b[r] B[4t + 16 r + i][g],
      // i = 0..3 from the low byte up; c[i] C[g + 8 (i >> 1)][2t + (i & 1)]. Exact integer sums; on
      // int32 overflow the uint32 arithmetic wraps (kernels must stay far from it).
      int32_t A[16][32], B[32][8];
      uint32_t C[16][8];
      for (int l = 0; l < 32; ++l) {
        const int g = l >> 2, t = l & 3;
        const uint32_t* in = c[l]->in;
        for (int r = 0; r < 4; ++r)
          for (int i = 0; i < 4; ++i) A[g + 8 * (r & 1)][4 * t + 16 * (r >> 1) + i] = int8_t(in[r] >> (8 * i));
        for (int r = 0; r < 2; ++r)
          for (int i = 0; i < 4; ++i) B[4 * t + 16 * r + i][g] = int8_t(in[4 + r] >> (8 * i));
        for (int i = 0; i < 4; ++i) C[g + 8 * (i >> 1)][2 * t + (i & 1)] = in[6 + i];
      }
      for (int l = 0; l < 32; ++l) {
        const int g = l >> 2, t = l & 3;
        for (int i = 0; i < 4; ++i) {
          const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
          uint32_t acc = C[row][col];
          for (int k = 0; k < 32; ++k) acc += uint32_t(A[row][k] * B[k][col]);
          c[l]->out[i] = acc;
        }
      }
      break;
    }
    case Op::ldmatrix:
    case Op::ldmatrix_trans: {
      // PTX ISA, "ldmatrix": lane 8i+r holds the address of row r of matrix i.
      const int nmat = c[0]->nwords;
      for (int l = 0; l < 32; ++l) {
        for (int i = 0; i < nmat; ++i) {
          uint16_t e[2];
          for (int h = 0; h < 2; ++h) {
            int row, col;
            if (op == Op::ldmatrix) { row = l >> 2; col = 2 * (l & 3) + h; }
            else { row = 2 * (l & 3) + h; col = l >> 2; }
            std::memcpy(&e[h], static_cast<const unsigned char*>(c[8 * i + row]->addr) + 2 * col, 2);
          }
          c[l]->out[i] = uint32_t(e[0]) | (uint32_t(e[1]) << 16);
        }
      }
      break;
    }
  }
}

void warp_collective(Collective& c, const char* file, int line) {
  if (!t_worker || !t_worker->cur) throw KernelError(op_name(c.op) + " called outside a simt kernel");
  Worker& w = *t_worker;
  Fiber& f = *w.cur;
  const unsigned bit = 1u << f.lane;
  const unsigned exist = existing_lanes(w, f.warp);
  count_warp_op();
  if (!(c.mask & bit))
    fail(file, line, op_name(c.op) + ": lane " + std::to_string(f.lane) + " is not in its own mask " + hex(c.mask));
  if (is_aligned_op(c.op) && (c.mask != 0xffffffffu || exist != 0xffffffffu))
    fail(file, line, op_name(c.op) + " needs all 32 lanes of a full warp (.sync.aligned)");
  if (is_shfl(c.op)) {
    const int width = int(c.in[6]);
    if (width < 1 || width > 32 || (width & (width - 1)))
      fail(file, line, op_name(c.op) + ": width " + std::to_string(width) + " is not a power of 2 in [1, 32]");
  }
  WarpState& ws = warp_at(w, f.warp);
  // A parked lane j whose mask includes this lane, while this lane's mask includes j, must be in
  // the same collective (same mask, same operation): each would wait for the other forever.
  // (If only one mask includes the other lane, that lane may just be behind: not an error yet;
  // the deadlock detector reports it if it never arrives.)
  for (unsigned m = ws.waiting & c.mask; m; m &= m - 1) {
    const unsigned j = unsigned(__builtin_ctz(m));
    const Fiber& o = fiber_at(w, f.warp * 32 + j);
    const Collective& oc = *o.coll;
    if ((oc.mask & bit) && (oc.mask != c.mask || oc.op != c.op))
      fail(file, line, "mismatched warp collective in warp " + std::to_string(f.warp) + ": lane " +
                           std::to_string(f.lane) + " calls " + op_name(c.op) + "(mask=" + hex(c.mask) +
                           ") while lane " + std::to_string(j) + " waits in " + op_name(oc.op) +
                           "(mask=" + hex(oc.mask) + ") called at " + site(o) + "; this call");
  }
  f.coll = &c;
  f.file = file;
  f.line = line;
  ws.waiting |= bit;
  const unsigned group = c.mask & exist;
  if ((ws.waiting & group) == group) {
    compute_collective(w, f.warp, group);
    ws.waiting &= ~group;
    std::vector<unsigned> others;
    for (unsigned m = group & ~bit; m; m &= m - 1) others.push_back(f.warp * 32 + unsigned(__builtin_ctz(m)));
    for (unsigned id : others) fiber_at(w, id).coll = nullptr;
    f.coll = nullptr;
    note_progress(w);
    // The completing lane continues; the others resume in schedule order.
    wake_in_order(w, others);
    return;
  }
  block_on_collective(w, f);
}

std::string describe_deadlock(Worker& w) {
  std::string s = "deadlock: no thread of the block can proceed";
  for (unsigned warp = 0; warp < w.warps.size(); ++warp) {
    const WarpState& ws = w.warps[warp];
    if (!ws.waiting) continue;
    // one line per distinct (op, mask) group of parked lanes
    unsigned left = ws.waiting;
    while (left) {
      const unsigned l0 = unsigned(__builtin_ctz(left));
      const Fiber& f0 = fiber_at(w, warp * 32 + l0);
      const Collective& c0 = *f0.coll;
      unsigned same = 0;
      for (unsigned m = left; m; m &= m - 1) {
        const unsigned j = unsigned(__builtin_ctz(m));
        const Collective& cj = *fiber_at(w, warp * 32 + j).coll;
        if (cj.op == c0.op && cj.mask == c0.mask) same |= 1u << j;
      }
      left &= ~same;
      const unsigned exist = existing_lanes(w, warp);
      const unsigned missing = c0.mask & exist & ~same;
      s += "; warp " + std::to_string(warp) + ": lanes " + lanes(same) + " wait in " + op_name(c0.op) + "(mask=" +
           hex(c0.mask) + ") at " + site(f0) + "; lanes " + lanes(missing) + " never arrive (";
      std::vector<std::pair<std::string, unsigned>> why;  // state -> lanes in that state
      for (unsigned m = missing; m; m &= m - 1) {
        const unsigned j = unsigned(__builtin_ctz(m));
        const Fiber& o = fiber_at(w, warp * 32 + j);
        std::string st = o.state == Fiber::done ? "exited"
                         : o.state == Fiber::barrier ? "at __syncthreads " + site(o)
                         : o.state == Fiber::warp_wait ? "in " + op_name(o.coll->op) + "(mask=" + hex(o.coll->mask) + ") at " + site(o)
                                                       : "running";
        auto it = std::find_if(why.begin(), why.end(), [&](const auto& p) { return p.first == st; });
        if (it == why.end()) why.emplace_back(st, 1u << j);
        else it->second |= 1u << j;
      }
      for (size_t k = 0; k < why.size(); ++k) s += (k ? ", " : "") + lanes(why[k].second) + ": " + why[k].first;
      s += ")";
    }
  }
  const std::string bar = describe_barrier_waiters(w);
  if (!bar.empty()) s += "; " + bar;
  return s;
}

}  // namespace simt::detail
