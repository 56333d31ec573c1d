/* CUDA's execution model on the CPU, for the part of it that pbn_gluon/csrc/pbn_kernels.cuh
 * uses: g++ compiles the kernel header unchanged with this file force-included
 * (`g++ -include cuda_emulation.h`), and tests/emulated_cuda.py launches its kernels.
 *
 * A launch runs its blocks one after another. The threads of a block are fibers (their own
 * stacks, switched by Context) that run until they reach a synchronisation point:
 *   __syncthreads(), __syncthreads_and(p)  every thread of the block that has not returned
 *   __shfl_down_sync(0xffffffff, v, d)     the 32 lanes of its warp, in lockstep:
 *                                          lane l gets lane l + d's v (its own if l + d > 31)
 * and leave it once every participant has arrived. Threads that wait at different points
 * (a barrier in divergent code, a shuffle in half a warp) are a deadlock on a GPU and an
 * error here. __shared__ variables are static: one copy, used by one block at a time.
 *
 * Under ThreadSanitizer (-fsanitize=thread) every CUDA thread is a TSan fiber and switching
 * fibers does not synchronise: the only happens-before edges between threads of a block are
 * its barriers (a shuffle exchanges registers, not memory), and a launch's blocks are ordered
 * after each other and after the host code around the launch. So a missing __syncthreads is a
 * reported data race, although the fibers never run at the same time.
 *
 * One launch at a time: the runtime's state is global, as a device's is.
 */
#ifndef PBN_CUDA_EMULATION_H_
#define PBN_CUDA_EMULATION_H_

#include <sys/mman.h>
#ifndef __x86_64__
#include <ucontext.h>
#endif

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#ifdef __SANITIZE_THREAD__
#include <sanitizer/tsan_interface.h>
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

using std::isfinite;

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace emu {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr size_t kStackBytes = 256 * 1024;

/* Tells TSan that `fiber` runs from now on; no happens-before edge. */
inline void switch_fiber(void* fiber) {
#ifdef __SANITIZE_THREAD__
  __tsan_switch_to_fiber(fiber, __tsan_switch_to_fiber_no_sync);
#else
  (void)fiber;
#endif
}

#ifdef __x86_64__
/* emu_switch_stack(&from, to): pushes the callee-saved registers, parks this stack in *from and
 * continues on `to` (parked so, or made by Context::start): swapcontext without its two
 * system calls for the signal mask, which would take most of the emulation's time. */
extern "C" void emu_switch_stack(void** from, void* to);
asm(R"(
  .pushsection .text
  .weak emu_switch_stack
  .type emu_switch_stack, @function
emu_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch_stack, .-emu_switch_stack
  .popsection
)");

/* Where a suspended fiber (or the scheduler) continues. */
struct Context {
  void* sp = nullptr;

  /* A fresh fiber on stack [base, base + size) that starts in entry(), which never returns. */
  void start(char* base, size_t size, void (*entry)()) {
    const uintptr_t aligned = reinterpret_cast<uintptr_t>(base + size) & ~uintptr_t{15};
    void** top = reinterpret_cast<void**>(aligned);
    *--top = nullptr;                       /* entry's return address */
    *--top = reinterpret_cast<void*>(entry); /* where the first switch "returns" to */
    for (int r = 0; r < 6; ++r) *--top = nullptr;
    sp = top;
  }
  /* Continues `to`, which is TSan's `fiber`. */
  static void jump(Context& from, Context& to, void* fiber) {
    void* target = to.sp; /* read as the fiber that leaves */
    switch_fiber(fiber);
    emu_switch_stack(&from.sp, target);
  }
};
#else
struct Context {
  ucontext_t context;

  void start(char* base, size_t size, void (*entry)()) {
    getcontext(&context);
    context.uc_stack.ss_sp = base;
    context.uc_stack.ss_size = size;
    context.uc_link = nullptr;
    makecontext(&context, entry, 0);
  }
  static void jump(Context& from, Context& to, void* fiber) {
    switch_fiber(fiber);
    swapcontext(&from.context, &to.context);
  }
};
#endif

enum Wait : int { kRunnable, kBarrier, kShuffle, kDone, kFailed };

/* One CUDA thread. The fields a fiber and the scheduler hand each other while a block runs
 * are relaxed atomics: TSan neither reports them nor orders anything by them. */
struct Thread {
  uint3 idx;
  Context context;
  void* fiber = nullptr;                   /* its TSan fiber */
  unsigned phase = 0;                      /* barriers passed in this block */
  std::atomic<int> wait{kRunnable};
  std::atomic<unsigned long long> value{0}; /* shuffled bits, or the barrier predicate */
  std::atomic<unsigned> delta{0};
  std::atomic<unsigned long long> result{0};
};

struct Device {
  dim3 grid, block;
  uint3 block_idx;
  std::function<void()> body; /* the kernel call */
  std::unique_ptr<Thread[]> threads;
  unsigned capacity = 0; /* threads (and stacks) allocated */
  char* stacks = nullptr;
  Context scheduler;
  void* scheduler_fiber = nullptr;
  std::atomic<Thread*> current{nullptr};
  std::string error;
  /* TSan synchronisation objects (their addresses): a block's start, every switch back to
   * the scheduler (which it acquires once the block is over), barriers by parity */
  char start_sync, yield_sync, barrier_sync[2];
};

inline Device& device() {
  static Device& d = *new Device; /* never destroyed: fibers may be suspended at exit */
  return d;
}

inline Thread& self() { return *device().current.load(std::memory_order_relaxed); }

inline void acquire(void* sync) {
#ifdef __SANITIZE_THREAD__
  __tsan_acquire(sync);
#else
  (void)sync;
#endif
}

inline void release(void* sync) {
#ifdef __SANITIZE_THREAD__
  __tsan_release(sync);
#else
  (void)sync;
#endif
}


/* In a fiber: waits (`why`) until the scheduler resumes it. */
inline void yield(Thread& t, Wait why) {
  Device& d = device();
  void* scheduler = d.scheduler_fiber;
  t.wait.store(why, std::memory_order_relaxed);
  release(&d.yield_sync); /* after the fiber's last access to what the scheduler writes */
  Context::jump(t.context, d.scheduler, scheduler);
}

/* In a fiber: stops the launch with `message`. */
[[noreturn]] inline void fail(const std::string& message) {
  Thread& t = self();
  const Device& d = device();
  char where[96];
  std::snprintf(where, sizeof where, " (block %u,%u,%u thread %u,%u,%u)", d.block_idx.x,
                d.block_idx.y, d.block_idx.z, t.idx.x, t.idx.y, t.idx.z);
  device().error = message + where;
  yield(t, kFailed);
  __builtin_unreachable();
}

/* In a fiber: a barrier of the whole block; returns the AND of every thread's predicate. */
inline int block_barrier(int predicate) {
  Thread& t = self();
  Device& d = device();
  t.value.store(predicate != 0, std::memory_order_relaxed);
  release(&d.barrier_sync[t.phase & 1]);
  yield(t, kBarrier);
  acquire(&d.barrier_sync[t.phase & 1]);
  ++t.phase;
  return static_cast<int>(t.result.load(std::memory_order_relaxed));
}

template <typename T>
T shuffle_down(unsigned mask, T v, unsigned delta, int width) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffle of a register");
  if (mask != kFullMask || width != kWarp) fail("only full-warp shuffles are emulated");
  Thread& t = self();
  unsigned long long bits = 0;
  std::memcpy(&bits, &v, sizeof v);
  t.value.store(bits, std::memory_order_relaxed);
  t.delta.store(delta, std::memory_order_relaxed);
  yield(t, kShuffle);
  bits = t.result.load(std::memory_order_relaxed);
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

/* A fiber's life: one CUDA thread of each block, one block after another. */
inline void fiber_main() {
  Device& d = device();
  Thread& t = self();
  for (;;) {
    acquire(&d.start_sync);
    d.body();
    yield(t, kDone);
  }
}

inline void resume(Device& d, Thread& t) {
  d.current.store(&t, std::memory_order_relaxed);
  Context::jump(d.scheduler, t.context, t.fiber);
}

/* Lets through every synchronisation point that all its participants have reached; false if
 * none could be (the block is stuck). */
inline bool pass_barriers(Device& d, unsigned n) {
  unsigned done = 0, at_barrier = 0;
  int all = 1;
  for (unsigned i = 0; i < n; ++i) {
    const int w = d.threads[i].wait.load(std::memory_order_relaxed);
    done += w == kDone;
    if (w == kBarrier) {
      ++at_barrier;
      all &= static_cast<int>(d.threads[i].value.load(std::memory_order_relaxed));
    }
  }
  bool passed = false;
  if (at_barrier > 0 && at_barrier == n - done) {
    for (unsigned i = 0; i < n; ++i) {
      if (d.threads[i].wait.load(std::memory_order_relaxed) != kBarrier) continue;
      d.threads[i].result.store(all, std::memory_order_relaxed);
      d.threads[i].wait.store(kRunnable, std::memory_order_relaxed);
    }
    passed = true;
  }
  for (unsigned first = 0; first + kWarp <= n; first += kWarp) {
    Thread* lane = &d.threads[first];
    bool ready = true;
    for (int l = 0; l < kWarp; ++l) {
      ready &= lane[l].wait.load(std::memory_order_relaxed) == kShuffle;
    }
    if (!ready) continue;
    for (int l = 0; l < kWarp; ++l) {
      const unsigned src = l + lane[l].delta.load(std::memory_order_relaxed);
      lane[l].result.store(lane[src < kWarp ? src : l].value.load(std::memory_order_relaxed),
                           std::memory_order_relaxed);
    }
    for (int l = 0; l < kWarp; ++l) lane[l].wait.store(kRunnable, std::memory_order_relaxed);
    passed = true;
  }
  return passed;
}

inline std::string stuck(Device& d, unsigned n) {
  unsigned count[kFailed] = {};
  for (unsigned i = 0; i < n; ++i) ++count[d.threads[i].wait.load(std::memory_order_relaxed)];
  char text[192];
  std::snprintf(text, sizeof text,
                "block %u,%u,%u deadlocks: %u threads at __syncthreads, %u at a warp shuffle "
                "(a warp whose lanes do not all shuffle), %u returned",
                d.block_idx.x, d.block_idx.y, d.block_idx.z, count[kBarrier], count[kShuffle],
                count[kDone]);
  return text;
}

/* Frees the threads' fibers and stacks. */
inline void discard(Device& d) {
  acquire(&d.yield_sync);
  if (d.stacks != nullptr) munmap(d.stacks, d.capacity * kStackBytes);
#ifdef __SANITIZE_THREAD__
  for (unsigned i = 0; i < d.capacity; ++i) __tsan_destroy_fiber(d.threads[i].fiber);
#endif
  d.threads.reset();
  d.stacks = nullptr;
  d.capacity = 0;
}

/* Gives every one of n threads a fiber and a stack (kept for later launches). */
inline void reserve(Device& d, unsigned n) {
  if (n <= d.capacity) return;
  discard(d);
  void* stacks = mmap(nullptr, n * kStackBytes, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (stacks == MAP_FAILED) return;
  d.stacks = static_cast<char*>(stacks);
  d.threads.reset(new Thread[n]);
  d.capacity = n;
  for (unsigned i = 0; i < n; ++i) {
    Thread& t = d.threads[i];
#ifdef __SANITIZE_THREAD__
    t.fiber = __tsan_create_fiber(0);
#endif
    t.context.start(d.stacks + i * kStackBytes, kStackBytes, fiber_main);
  }
}

/* Runs block d.block_idx; false (d.error says why) if it failed. */
inline bool run_block(Device& d, unsigned n) {
  for (unsigned i = 0; i < n; ++i) {
    Thread& t = d.threads[i];
    t.idx = {i % d.block.x, i / d.block.x % d.block.y, i / (d.block.x * d.block.y)};
    t.phase = 0;
    t.wait.store(kRunnable, std::memory_order_relaxed);
  }
  release(&d.start_sync);
  for (unsigned done = 0; done < n;) {
    for (unsigned i = 0; i < n; ++i) {
      if (d.threads[i].wait.load(std::memory_order_relaxed) != kRunnable) continue;
      resume(d, d.threads[i]);
      if (d.threads[i].wait.load(std::memory_order_relaxed) == kFailed) return false;
    }
    done = 0;
    for (unsigned i = 0; i < n; ++i) {
      done += d.threads[i].wait.load(std::memory_order_relaxed) == kDone;
    }
    if (done < n && !pass_barriers(d, n)) {
      d.error = stuck(d, n);
      return false;
    }
  }
  acquire(&d.yield_sync);
  return true;
}

/* Runs body() as the kernel of a grid x block launch; "" or what went wrong. */
inline std::string run_grid(dim3 grid, dim3 block, std::function<void()> body) {
  Device& d = device();
  const unsigned long long n = 1ull * block.x * block.y * block.z;
  if (n == 0 || n > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0) {
    return "invalid launch: a block holds 1 to 1024 threads and every grid size is >= 1";
  }
  reserve(d, static_cast<unsigned>(n));
  if (d.capacity < n) return "could not allocate the threads' stacks";
#ifdef __SANITIZE_THREAD__
  d.scheduler_fiber = __tsan_get_current_fiber();
#endif
  d.grid = grid;
  d.block = block;
  d.body = std::move(body);
  d.error.clear();
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        d.block_idx = {x, y, z};
        if (!run_block(d, static_cast<unsigned>(n))) {
          discard(d); /* its fibers stopped mid-kernel: later launches start afresh */
          return d.error;
        }
      }
    }
  }
  return "";
}

/* kernel<<<grid, block>>>(args...) */
template <typename... P, typename... A>
std::string launch(dim3 grid, dim3 block, void (*kernel)(P...), A&&... args) {
  std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  return run_grid(grid, block, [&params, kernel] { std::apply(kernel, params); });
}

/* A launch with the arguments passed as cuLaunchKernel takes them: params[i] points at the
 * value of argument i. */
template <auto Kernel>
std::string launch_packed(dim3 grid, dim3 block, void** params) {
  return [&]<typename... P>(void (*)(P...)) {
    return [&]<size_t... I>(std::index_sequence<I...>) {
      return launch(grid, block, Kernel, *static_cast<std::decay_t<P>*>(params[I])...);
    }(std::index_sequence_for<P...>{});
  }(Kernel);
}

/* A kernel argument type's code: f float, d double, i int, l long, pointers with a leading
 * 'P', a struct passed by value S<its size in bytes>. */
template <typename T>
std::string type_code() {
  using U = std::remove_cv_t<T>;
  if constexpr (std::is_pointer_v<U>) return "P" + type_code<std::remove_pointer_t<U>>();
  else if constexpr (std::is_same_v<U, float>) return "f";
  else if constexpr (std::is_same_v<U, double>) return "d";
  else if constexpr (std::is_same_v<U, int>) return "i";
  else if constexpr (std::is_same_v<U, long>) return "l";
  else if constexpr (std::is_class_v<U> && std::is_trivially_copyable_v<U>) {
    return "S" + std::to_string(sizeof(U));
  }
  else static_assert(sizeof(T) == 0, "a kernel argument type the emulation does not know");
}

/* "Pf,l,l" for kernel(const float*, long, long) */
template <typename... P>
std::string signature(void (*)(P...)) {
  std::string s;
  ((s += (s.empty() ? "" : ",") + type_code<P>()), ...);
  return s;
}

struct Entry {
  const char* name;
  std::string signature;
  std::string (*launch)(dim3, dim3, void**);
};

}  // namespace emu

#define threadIdx (::emu::self().idx)
#define blockIdx (::emu::device().block_idx)
#define blockDim (::emu::device().block)
#define gridDim (::emu::device().grid)

inline void __syncthreads() { emu::block_barrier(1); }
inline int __syncthreads_and(int predicate) { return emu::block_barrier(predicate); }
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = emu::kWarp) {
  return emu::shuffle_down(mask, v, delta, width);
}

/* The table entry of one kernel, for EMU_EXPORT. */
#define EMU_KERNEL(name) \
  ::emu::Entry { #name, ::emu::signature(name), &::emu::launch_packed<name> }

/* The C interface tests/emulated_cuda.py loads: the kernels of `table`, their argument types,
 * and a launch that returns 0, or 1 with the error in `error`. */
#define EMU_EXPORT(table)                                                                   \
  extern "C" int emu_kernel_count() { return sizeof(table) / sizeof(table[0]); }           \
  extern "C" const char* emu_kernel_name(int k) { return table[k].name; }                  \
  extern "C" const char* emu_kernel_signature(int k) { return table[k].signature.c_str(); } \
  extern "C" int emu_launch(int k, const unsigned* grid, const unsigned* block,            \
                            void** params, char* error, int error_size) {                  \
    const std::string e = table[k].launch(dim3(grid[0], grid[1], grid[2]),                 \
                                           dim3(block[0], block[1], block[2]), params);     \
    std::snprintf(error, error_size, "%s", e.c_str());                                     \
    return e.empty() ? 0 : 1;                                                               \
  }

#endif /* PBN_CUDA_EMULATION_H_ */
