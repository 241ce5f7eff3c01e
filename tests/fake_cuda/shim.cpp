// A do-nothing CUDA for torch's CPU build: a device guard and CUDA hooks, so that FakeTensorMode can
// create, move and differentiate tensors on "cuda" without a GPU (tests/fake_cuda/trace.py).
// Nothing here computes: FakeTensorMode never runs a kernel. Built by tests/fake_cuda/harness.py
// against the installed torch's headers and loaded with LD_PRELOAD before torch is imported,
// because torch caches the CUDA hooks the first time it asks for them.
#include <ATen/detail/CUDAHooksInterface.h>
#include <ATen/core/Generator.h>
#include <c10/core/GeneratorImpl.h>
#include <c10/core/TensorImpl.h>
#include <c10/core/impl/FakeGuardImpl.h>
#include <ATen/ATen.h>

namespace fake_cuda {

// The state of torch's real CUDA generator is 16 bytes (seed, offset): so is this one's, so that a
// checkpoint written on a GPU has the state size a GPU run writes.
struct Generator final : public c10::GeneratorImpl {
  explicit Generator(c10::DeviceIndex index)
      : c10::GeneratorImpl(c10::Device(c10::DeviceType::CUDA, index), c10::DispatchKeySet(c10::DispatchKey::CUDA)) {}
  void set_current_seed(uint64_t seed) override { seed_ = seed; offset_ = 0; }
  void set_offset(uint64_t offset) override { offset_ = offset; }
  uint64_t get_offset() const override { return offset_; }
  uint64_t current_seed() const override { return seed_; }
  uint64_t seed() override { set_current_seed(67280421310721ULL); return seed_; }
  void set_state(const c10::TensorImpl& state) override {
    TORCH_CHECK(state.numel() == 16, "RNG state is wrong size");
    auto* bytes = static_cast<const uint64_t*>(state.data());
    seed_ = bytes[0];
    offset_ = bytes[1];
  }
  c10::intrusive_ptr<c10::TensorImpl> get_state() const override {
    auto state = at::empty({16}, at::TensorOptions().dtype(at::kByte));
    auto* bytes = static_cast<uint64_t*>(state.data_ptr());
    bytes[0] = seed_;
    bytes[1] = offset_;
    return state.getIntrusivePtr();
  }
  static c10::DeviceType device_type() { return c10::DeviceType::CUDA; }

 private:
  Generator* clone_impl() const override {
    auto* copy = new Generator(device().index());
    copy->seed_ = seed_;
    copy->offset_ = offset_;
    return copy;
  }
  uint64_t seed_ = 67280421310721ULL;
  uint64_t offset_ = 0;
};

struct CUDAHooks final : public at::CUDAHooksInterface {
  explicit CUDAHooks(at::CUDAHooksArgs) {}
  void init() const override {}
  bool hasCUDA() const override { return true; }
  bool isBuilt() const override { return true; }
  bool isAvailable() const override { return true; }
  bool hasPrimaryContext(c10::DeviceIndex) const override { return true; }
  c10::DeviceIndex deviceCount() const override { return 2; }
  int getNumGPUs() const override { return 2; }
  c10::DeviceIndex current_device() const override { return 0; }
  c10::DeviceIndex getCurrentDevice() const override { return 0; }
  void setCurrentDevice(c10::DeviceIndex) const override {}
  bool isPinnedPtr(const void*) const override { return false; }
  at::Generator getNewGenerator(c10::DeviceIndex index) const override {
    return at::make_generator<Generator>(index < 0 ? 0 : index);
  }
  const at::Generator& getDefaultGenerator(c10::DeviceIndex index) const override {
    static at::Generator generators[2] = {at::make_generator<Generator>(0), at::make_generator<Generator>(1)};
    return generators[index < 0 ? 0 : index];
  }
  void deviceSynchronize(c10::DeviceIndex) const override {}
};

}  // namespace fake_cuda

namespace at {
using fake_cuda::CUDAHooks;
REGISTER_CUDA_HOOKS(CUDAHooks);
}  // namespace at

namespace c10::impl {
C10_REGISTER_GUARD_IMPL(CUDA, FakeGuardImpl<DeviceType::CUDA>);
}
