// pybind11 wrapper of the CUDA kernels (csrc/cuda), built as the separate
// module pycompress._kernels_cuda (PYCOMPRESS_CUDA=ON), so the CPU module
// never needs the CUDA runtime. Like bindings.cpp for the CPU kernels, the
// only file of this module that knows pybind11. Blocks and candidates may be
// numpy arrays or device arrays (__cuda_array_interface__: torch CUDA
// tensors, CuPy) read in place.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "cuda/covariance_cuda.hpp"
#include "cuda/cuda_util.hpp"
#include "cuda/gp_acquisition_cuda.hpp"
#include "kernels/covariance.hpp"

namespace py = pybind11;
using namespace pycompress;
using pycompress::cuda::CudaCovariance;

namespace {

// A 2-D device array described by __cuda_array_interface__ (v2/v3).
struct DeviceMatrix {
    const void* ptr = nullptr;
    int64_t rows = 0, cols = 0;
    int64_t row_stride = 0;  // elements
    int64_t col_stride = 1;  // elements
    std::string typestr;
};

bool device_matrix(const py::handle& obj, DeviceMatrix* out) {
    if (!py::hasattr(obj, "__cuda_array_interface__")) return false;
    py::dict cai = obj.attr("__cuda_array_interface__");
    auto shape = cai["shape"].cast<std::vector<int64_t>>();
    if (shape.size() != 2) throw py::value_error("device array must be 2-D");
    out->typestr = cai["typestr"].cast<std::string>();
    const int64_t item = out->typestr == "<f4" ? 4 : out->typestr == "<f8" ? 8 : 0;
    if (!item) throw py::value_error("device array must be float32 or float64, got " + out->typestr);
    out->ptr = reinterpret_cast<const void*>(cai["data"].cast<py::tuple>()[0].cast<uintptr_t>());
    out->rows = shape[0];
    out->cols = shape[1];
    out->row_stride = shape[1];
    out->col_stride = 1;
    if (cai.contains("strides") && !cai["strides"].is_none()) {
        auto strides = cai["strides"].cast<std::vector<int64_t>>();
        if (strides[0] % item || strides[1] % item) throw py::value_error("device array strides not whole elements");
        out->row_stride = strides[0] / item;
        out->col_stride = strides[1] / item;
    }
    return true;
}

void covariance_update(CudaCovariance& acc, const py::object& block) {
    DeviceMatrix dm;
    if (device_matrix(block, &dm)) {
        if (dm.cols != acc.dim())
            throw py::value_error("block must have shape (rows, " + std::to_string(acc.dim()) + ")");
        if (dm.rows == 0) return;
        if ((dm.cols > 1 && dm.col_stride != 1) || (dm.rows > 1 && dm.row_stride < dm.cols))
            throw py::value_error("device block: a row's elements must be contiguous (call .contiguous())");
        const int64_t stride = dm.rows > 1 ? dm.row_stride : dm.cols;
        py::gil_scoped_release nogil;
        if (dm.typestr == "<f4")
            acc.update_f32(static_cast<const float*>(dm.ptr), dm.rows, stride, true);
        else
            acc.update_f64(static_cast<const double*>(dm.ptr), dm.rows, stride, true);
        return;
    }
    py::array arr = py::array::ensure(block);
    if (!arr || arr.ndim() != 2 || arr.shape(1) != acc.dim())
        throw py::value_error("block must have shape (rows, " + std::to_string(acc.dim()) + ")");
    const int64_t rows = arr.shape(0);
    if (rows == 0) return;
    if (arr.dtype().is(py::dtype::of<float>())) {
        auto a = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(arr);
        py::gil_scoped_release nogil;
        acc.update_f32(a.data(), rows, acc.dim(), false);
    } else {
        auto a = py::array_t<double, py::array::c_style | py::array::forcecast>::ensure(arr);
        py::gil_scoped_release nogil;
        acc.update_f64(a.data(), rows, acc.dim(), false);
    }
}

// The host-side finish (scatter, covariance, correlation) is the CPU
// accumulator's, fed the device state as one chunk summary.
CovarianceAccumulator on_host(const CudaCovariance& acc) {
    CovarianceAccumulator host(acc.dim());
    const std::vector<double> upper = acc.scatter_upper();
    host.merge_summary(acc.count(), acc.mean().data(), upper.data(), acc.dim());
    return host;
}

py::array_t<double> square(const std::vector<double>& values, int64_t d) {
    py::array_t<double> out({d, d});
    std::copy(values.begin(), values.end(), out.mutable_data());
    return out;
}

using Array64 = py::array_t<double, py::array::c_style | py::array::forcecast>;

Array64 as_array(const py::handle& obj, const char* name, int ndim, int64_t dim0, int64_t dim1) {
    Array64 a = Array64::ensure(obj);
    if (!a || a.ndim() != ndim || (dim0 >= 0 && a.shape(0) != dim0) || (ndim == 2 && dim1 >= 0 && a.shape(1) != dim1))
        throw py::value_error(std::string(name) + " has the wrong shape");
    return a;
}

py::tuple gp_acquisition(const py::object& candidates, const py::object& train_x, const py::object& lengthscales,
                         double outputscale, double mean_constant, const py::object& chol, const py::object& beta,
                         const py::object& incumbent, double delta, double var_floor, int /*threads*/) {
    Array64 x = as_array(train_x, "train_x", 2, -1, -1);
    const int64_t n = x.shape(0), d = x.shape(1);
    Array64 l = as_array(chol, "chol", 2, n, n);
    Array64 ls = as_array(lengthscales, "lengthscales", 1, d, -1);
    Array64 bt = as_array(beta, "beta", 1, n, -1);
    Array64 inc = as_array(incumbent, "incumbent", 1, d, -1);
    DeviceMatrix dm;
    Array64 host_c;
    const double* cptr;
    int64_t m;
    const bool on_device = device_matrix(candidates, &dm);
    if (on_device) {
        if (dm.typestr != "<f8" || dm.cols != d || dm.col_stride != 1 || (dm.rows > 1 && dm.row_stride != d))
            throw py::value_error("device candidates must be a C-contiguous float64 (M, d) array");
        cptr = static_cast<const double*>(dm.ptr);
        m = dm.rows;
    } else {
        host_c = as_array(candidates, "candidates", 2, -1, d);
        cptr = host_c.data();
        m = host_c.shape(0);
    }
    py::array_t<double> z(m), mu(m), var(m), cov(m);
    GpPosteriorData gp;
    gp.n = n;
    gp.d = d;
    gp.train = x.data();
    gp.lengthscales = ls.data();
    gp.outputscale = outputscale;
    gp.mean_constant = mean_constant;
    gp.chol = l.data();
    gp.beta = bt.data();
    PacScores out{z.mutable_data(), mu.mutable_data(), var.mutable_data(), cov.mutable_data()};
    double mu_hat = 0.0, var_hat = 0.0;
    {
        py::gil_scoped_release nogil;
        cuda::gp_pac_scores_cuda(gp, cptr, m, on_device, inc.data(), delta, var_floor, out, &mu_hat, &var_hat);
    }
    return py::make_tuple(z, mu, var, cov);
}

}  // namespace

PYBIND11_MODULE(_kernels_cuda, m) {
    m.doc() = "pycompress CUDA kernels (see pycompress.kernels for dispatch)";
    m.def("device_count", [] { return cuda::device_count(nullptr); }, "Visible CUDA devices (0 without a driver).");
    m.def("device_error", [] {
        std::string why;
        cuda::device_count(&why);
        return why;
    }, "Why no device is usable ('' when one is).");
    m.def("load_cublas", &cuda::load_cublas, py::arg("candidates"),
          "dlopen the first usable cuBLAS among the names/paths; '' on success, else the reasons.");

    py::class_<CudaCovariance>(m, "CovarianceAccumulator")
        .def(py::init<int64_t>(), py::arg("dim"))
        .def("update", &covariance_update, py::arg("block"),
             "Add a (rows, dim) float32/float64 block (numpy or CUDA array); float64 state on the device.")
        .def("merge", &CudaCovariance::merge, py::arg("other"))
        .def("synchronize", &CudaCovariance::synchronize)
        .def_property_readonly("dim", &CudaCovariance::dim)
        .def_property_readonly("count", &CudaCovariance::count)
        .def_property_readonly("mean", [](const CudaCovariance& a) {
            return py::array_t<double>(a.dim(), a.mean().data());
        })
        .def_property_readonly("scatter", [](const CudaCovariance& a) {
            return square(on_host(a).scatter(), a.dim());
        })
        .def_property_readonly("cov", [](const CudaCovariance& a) {
            if (a.count() < 2) throw py::value_error("covariance needs at least 2 rows");
            return square(on_host(a).covariance(), a.dim());
        })
        .def("correlation", [](const CudaCovariance& a, double floor) {
            if (a.count() < 2) throw py::value_error("correlation needs at least 2 rows");
            return square(on_host(a).correlation(floor), a.dim());
        }, py::arg("floor") = 1e-8);

    m.def("gp_acquisition", &gp_acquisition, py::arg("candidates"), py::arg("train_x"), py::arg("lengthscales"),
          py::arg("outputscale"), py::arg("mean_constant"), py::arg("chol"), py::arg("beta"), py::arg("incumbent"),
          py::arg("delta"), py::arg("var_floor") = 1e-12, py::arg("threads") = 0,
          "PAC scores (z, mu, var, cov) on the GPU; same contract as the CPU kernel.");
}
