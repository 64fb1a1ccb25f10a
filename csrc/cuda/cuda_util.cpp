#include "cuda_util.hpp"

#include <dlfcn.h>

namespace pycompress::cuda {

int device_count(std::string* why) {
    int count = 0;
    const cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess) {
        if (why) *why = cudaGetErrorString(err);
        cudaGetLastError();  // clear the sticky error state
        return 0;
    }
    if (count == 0 && why) *why = "no CUDA device";
    return count;
}

namespace {
Cublas& state() {
    static Cublas instance;
    return instance;
}
std::string& load_error() {
    static std::string error = "cuBLAS not loaded yet";
    return error;
}
}  // namespace

std::string load_cublas(const std::vector<std::string>& candidates) {
    Cublas& c = state();
    if (c.handle) return "";
    std::string tried;
    for (const auto& name : candidates) {
        void* lib = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
        if (!lib) {
            tried += "\n  " + name + ": " + dlerror();
            continue;
        }
        c.create = reinterpret_cast<Cublas::create_t>(dlsym(lib, "cublasCreate_v2"));
        c.destroy = reinterpret_cast<Cublas::destroy_t>(dlsym(lib, "cublasDestroy_v2"));
        c.ssyrk = reinterpret_cast<Cublas::ssyrk_t>(dlsym(lib, "cublasSsyrk_v2"));
        c.dsyrk = reinterpret_cast<Cublas::dsyrk_t>(dlsym(lib, "cublasDsyrk_v2"));
        if (!c.create || !c.destroy || !c.ssyrk || !c.dsyrk) {
            tried += "\n  " + name + ": lacks the cuBLAS v2 symbols";
            continue;
        }
        const int status = c.create(&c.handle);
        if (status != 0 || !c.handle) {
            c.handle = nullptr;
            tried += "\n  " + name + ": cublasCreate failed with status " + std::to_string(status);
            continue;
        }
        c.library = name;
        load_error().clear();
        return "";
    }
    load_error() = "cuBLAS could not be loaded:" + tried;
    return load_error();
}

Cublas& cublas() {
    if (!state().handle) throw std::runtime_error(load_error());
    return state();
}

}  // namespace pycompress::cuda
