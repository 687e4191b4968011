// The emulator behind emu.h: fibers (ucontext) for CUDA threads, barriers, warp collectives,
// the mma/ldmatrix/cp.async models. Single OS thread; see emu.h for what it checks.
#include "emu.h"

#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;

struct CopyJob {
  void* dst;
  const void* src;
  bool valid;
};

struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  Dim3 tid;
  bool done = false;
  std::vector<std::vector<CopyJob>> groups;  // committed cp.async groups, oldest first
  std::vector<CopyJob> open_group;
};

struct Barrier {
  int arrived = 0, live = 0;
  uint64_t generation = 0;
};

struct Warp {
  Barrier barrier;
  float values[32];
  const void* addresses[32];
  uint32_t a[32][4], b[32][2];
};

struct Machine {
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  Barrier block_barrier;
  int current = -1;
  Dim3 block_idx, block_dim, grid_dim;
  const std::function<void()>* body = nullptr;
  std::mt19937 rng{12345};
  std::vector<unsigned char> shared = std::vector<unsigned char>(kSharedBytes);
  size_t smem_bytes = 0;
  bool progressed = false;
  std::string copies_mode;          // FASTATTN_EMU_COPIES: "early", "late" or random per copy
  std::vector<double> warp_stall;   // per warp: chance to sit out a scheduling round
  std::vector<int> warp_frozen;     // per warp: rounds it still sits out after a block barrier
  std::string error;
};

Machine& machine() {
  static Machine m;
  return m;
}

Fiber& self() { return machine().fibers[machine().current]; }
int lane() { return machine().current & 31; }
Warp& warp() { return machine().warps[machine().current >> 5]; }

void fail(const std::string& what) {
  Machine& m = machine();
  if (m.error.empty()) {
    m.error = what + " (block " + std::to_string(m.block_idx.x) + ", thread " + std::to_string(m.current) + ")";
  }
}

void yield() {
  Machine& m = machine();
  swapcontext(&m.fibers[m.current].context, &m.scheduler);
}

void release(Barrier& b) {
  Machine& m = machine();
  b.arrived = 0;
  b.generation++;
  m.progressed = true;
  if (&b == &m.block_barrier && !m.warp_frozen.empty()) {
    // Right after a block barrier one warp falls far behind: whatever the others write before the
    // next barrier lands while it still reads what the barrier was meant to protect.
    m.warp_frozen[m.rng() % m.warp_frozen.size()] = static_cast<int>(m.rng() % 48);
  }
}

// Waits until every live member has arrived; the last one releases the others.
void arrive_and_wait(Barrier& b) {
  machine().progressed = true;
  const uint64_t generation = b.generation;
  if (++b.arrived >= b.live) {
    release(b);
    return;
  }
  while (b.generation == generation) yield();
}

void leave(Barrier& b) {
  b.live--;
  if (b.arrived > 0 && b.arrived >= b.live) release(b);
}

bool in_shared(const void* p, size_t bytes) {
  const Machine& m = machine();
  const auto* c = static_cast<const unsigned char*>(p);
  return c >= m.shared.data() && c + bytes <= m.shared.data() + m.smem_bytes;
}

void run_copy(const CopyJob& job) {
  if (job.valid) {
    std::memcpy(job.dst, job.src, 16);
  } else {
    std::memset(job.dst, 0, 16);
  }
}

void fiber_entry() {
  Machine& m = machine();
  (*m.body)();
  Fiber& f = self();
  if (!f.open_group.empty() || !f.groups.empty()) fail("cp.async copies still in flight when the thread exits");
  f.done = true;
  m.progressed = true;
  leave(m.block_barrier);
  leave(m.warps[m.current >> 5].barrier);
}

float unpack(uint32_t bits, bool high, bool bf16) {
  const uint16_t h = static_cast<uint16_t>(high ? bits >> 16 : bits & 0xffffu);
  if (bf16) {
    const uint32_t f = static_cast<uint32_t>(h) << 16;
    float out;
    std::memcpy(&out, &f, sizeof(out));
    return out;
  }
  __half_raw raw;
  raw.x = h;
  return __half2float(__half(raw));
}

}  // namespace

Dim3& thread_idx() { return self().tid; }
Dim3& block_idx() { return machine().block_idx; }
Dim3& block_dim() { return machine().block_dim; }
Dim3& grid_dim() { return machine().grid_dim; }

unsigned char* dynamic_shared() { return machine().shared.data(); }

void syncthreads() { arrive_and_wait(machine().block_barrier); }

float shfl_xor(float value, int lane_mask) {
  Warp& w = warp();
  if (w.barrier.live != 32) fail("warp shuffle with exited lanes");
  w.values[lane()] = value;
  arrive_and_wait(w.barrier);
  const float out = w.values[lane() ^ lane_mask];
  arrive_and_wait(w.barrier);
  return out;
}

// ldmatrix.x4: lanes 8m..8m+7 give the rows of matrix m; register m of lane l gets
// (row l/4, cols 2(l%4), +1) of matrix m, or with .trans (rows 2(l%4), +1; col l/4).
void ldmatrix_x4(uint32_t (&regs)[4], const void* row_address, bool transpose) {
  Warp& w = warp();
  if (w.barrier.live != 32) fail("ldmatrix with exited lanes");
  if (reinterpret_cast<uintptr_t>(row_address) % 16 != 0) fail("ldmatrix row address not 16-byte aligned");
  if (!in_shared(row_address, 16)) fail("ldmatrix row address outside shared memory");
  w.addresses[lane()] = row_address;
  arrive_and_wait(w.barrier);
  const int l = lane();
  for (int m = 0; m < 4; ++m) {
    auto element = [&](int r, int c) { return static_cast<const uint16_t*>(w.addresses[8 * m + r])[c]; };
    const uint16_t low = transpose ? element(2 * (l % 4), l / 4) : element(l / 4, 2 * (l % 4));
    const uint16_t high = transpose ? element(2 * (l % 4) + 1, l / 4) : element(l / 4, 2 * (l % 4) + 1);
    regs[m] = static_cast<uint32_t>(low) | (static_cast<uint32_t>(high) << 16);
  }
  arrive_and_wait(w.barrier);
}

// mma.sync.m16n8k16.row.col, f32 accumulate. A: rows g, g+8, cols 2t(+1), 2t+8(+1) in regs
// (a0: g, 2t), (a1: g+8, 2t), (a2: g, 2t+8), (a3: g+8, 2t+8); B: b0 rows 2t(+1), b1 rows 2t+8(+1),
// col g; C: c0, c1 row g, c2, c3 row g+8, cols 2t, 2t+1 (g = lane/4, t = lane%4).
void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  Warp& w = warp();
  if (w.barrier.live != 32) fail("mma with exited lanes");
  const int l = lane();
  std::memcpy(w.a[l], a, sizeof(w.a[l]));
  w.b[l][0] = b0;
  w.b[l][1] = b1;
  arrive_and_wait(w.barrier);
  float A[16][16], B[16][8];
  for (int src = 0; src < 32; ++src) {
    const int g = src / 4, t = src % 4;
    for (int half = 0; half < 2; ++half) {
      A[g][2 * t + half] = unpack(w.a[src][0], half, bf16);
      A[g + 8][2 * t + half] = unpack(w.a[src][1], half, bf16);
      A[g][2 * t + 8 + half] = unpack(w.a[src][2], half, bf16);
      A[g + 8][2 * t + 8 + half] = unpack(w.a[src][3], half, bf16);
      B[2 * t + half][g] = unpack(w.b[src][0], half, bf16);
      B[2 * t + 8 + half][g] = unpack(w.b[src][1], half, bf16);
    }
  }
  for (int e = 0; e < 4; ++e) {
    const int row = l / 4 + (e >> 1) * 8, col = 2 * (l % 4) + (e & 1);
    float sum = c[e];
    for (int k = 0; k < 16; ++k) sum += A[row][k] * B[k][col];
    c[e] = sum;
  }
  arrive_and_wait(w.barrier);
}

void cp_async_16(void* smem, const void* gmem, bool valid) {
  if (reinterpret_cast<uintptr_t>(smem) % 16 != 0 || (valid && reinterpret_cast<uintptr_t>(gmem) % 16 != 0)) {
    fail("cp.async address not 16-byte aligned");
  }
  if (!in_shared(smem, 16)) fail("cp.async destination outside shared memory");
  // A copy lands somewhere between its issue and the wait that covers it: at one end or the other.
  const CopyJob job{smem, gmem, valid};
  Machine& m = machine();
  const bool early = m.copies_mode == "early" || (m.copies_mode != "late" && (m.rng() & 1u));
  if (early) {
    run_copy(job);
  } else {
    self().open_group.push_back(job);
  }
}

void cp_async_commit() {
  Fiber& f = self();
  f.groups.push_back(std::move(f.open_group));
  f.open_group.clear();
}

void cp_async_wait(int pending) {
  Fiber& f = self();
  while (static_cast<int>(f.groups.size()) > pending) {
    for (const CopyJob& job : f.groups.front()) run_copy(job);
    f.groups.erase(f.groups.begin());
  }
}

void trap() {
  std::fprintf(stderr, "emu: __trap() in block %u thread %d\n", machine().block_idx.x, machine().current);
  std::abort();
}

cudaError_t run_grid(int64_t blocks, int threads, size_t smem_bytes, const std::function<void()>& body) {
  Machine& m = machine();
  m.error.clear();
  if (const char* seed = std::getenv("FASTATTN_EMU_SEED")) m.rng.seed(static_cast<unsigned>(std::atoi(seed)));
  const char* copies = std::getenv("FASTATTN_EMU_COPIES");
  m.copies_mode = copies != nullptr ? copies : "random";
  m.body = &body;
  m.block_dim = {static_cast<unsigned>(threads), 1, 1};
  m.grid_dim = {static_cast<unsigned>(blocks), 1, 1};
  m.smem_bytes = smem_bytes;
  m.fibers.resize(threads);
  m.warps.assign(threads / 32, Warp{});
  std::vector<int> order(threads);
  // Blocks run one after another, in a shuffled order: a GPU promises no order between blocks,
  // so results that depend on it (float atomics from several blocks) differ from run to run.
  std::vector<int64_t> block_order(static_cast<size_t>(blocks));
  for (int64_t block = 0; block < blocks; ++block) block_order[static_cast<size_t>(block)] = block;
  std::shuffle(block_order.begin(), block_order.end(), m.rng);
  for (size_t position = 0; position < block_order.size() && m.error.empty(); ++position) {
    const int64_t block = block_order[position];
    m.block_idx = {static_cast<unsigned>(block), 0, 0};
    std::memset(m.shared.data(), 0xff, smem_bytes);  // unwritten shared memory reads as NaN
    m.block_barrier = Barrier{0, threads, 0};
    for (Warp& w : m.warps) w.barrier = Barrier{0, 32, 0};
    // Warps run at random speeds so that they drift apart between block barriers, as on a GPU:
    // a read of another warp's data without a barrier then sees it too early or too late.
    std::uniform_real_distribution<double> stall(0.0, 0.8);
    m.warp_stall.resize(m.warps.size());
    for (double& chance : m.warp_stall) chance = stall(m.rng);
    m.warp_frozen.assign(m.warps.size(), 0);
    for (int t = 0; t < threads; ++t) {
      Fiber& f = m.fibers[t];
      f.stack.resize(kStackBytes);
      f.done = false;
      f.tid = {static_cast<unsigned>(t), 0, 0};
      f.groups.clear();
      f.open_group.clear();
      getcontext(&f.context);
      f.context.uc_stack.ss_sp = f.stack.data();
      f.context.uc_stack.ss_size = f.stack.size();
      f.context.uc_link = &m.scheduler;
      makecontext(&f.context, fiber_entry, 0);
    }
    while (true) {
      order.clear();
      for (int t = 0; t < threads; ++t) {
        if (!m.fibers[t].done) order.push_back(t);
      }
      if (order.empty()) break;
      std::shuffle(order.begin(), order.end(), m.rng);
      std::vector<bool> sits_out(m.warps.size());
      std::uniform_real_distribution<double> coin(0.0, 1.0);
      bool stalled = false;
      for (size_t w = 0; w < m.warps.size(); ++w) {
        sits_out[w] = m.warp_frozen[w] > 0 || coin(m.rng) < m.warp_stall[w];
        if (m.warp_frozen[w] > 0) m.warp_frozen[w]--;
        stalled = stalled || sits_out[w];
      }
      m.progressed = false;
      for (int t : order) {
        if (m.fibers[t].done || sits_out[t >> 5]) continue;
        m.current = t;
        swapcontext(&m.scheduler, &m.fibers[t].context);
      }
      if (!m.progressed && !stalled) {
        fail("deadlock: threads wait at barriers that cannot complete");
        break;
      }
    }
  }
  m.current = -1;
  if (!m.error.empty()) {
    std::fprintf(stderr, "emu: %s\n", m.error.c_str());
    return cudaErrorLaunchFailure;
  }
  return cudaSuccess;
}

}  // namespace emu
