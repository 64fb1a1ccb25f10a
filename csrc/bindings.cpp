// The only file that knows pybind11: wraps the plain C++ kernels in
// pycompress._kernels. Arrays arrive as contiguous numpy buffers.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "kernels/blas.hpp"
#include "kernels/covariance.hpp"
#include "kernels/pfa_select.hpp"

namespace py = pybind11;
using namespace pycompress;

namespace {

template <typename Fn>
Fn scipy_blas(const py::dict& capi, const char* name) {
    // cython_blas exports each routine as a PyCapsule named by its C signature.
    py::capsule cap = capi[name].cast<py::capsule>();
    return reinterpret_cast<Fn>(cap.get_pointer());
}

void load_blas() {
    py::dict capi = py::module_::import("scipy.linalg.cython_blas").attr("__pyx_capi__");
    Blas& b = blas();
    b.ssyrk = scipy_blas<ssyrk_t>(capi, "ssyrk");
    b.dsyrk = scipy_blas<dsyrk_t>(capi, "dsyrk");
    b.dgemm = scipy_blas<dgemm_t>(capi, "dgemm");
    b.dtrsm = scipy_blas<dtrsm_t>(capi, "dtrsm");
}

py::array_t<double> square(const std::vector<double>& values, int64_t d) {
    py::array_t<double> out({d, d});
    std::copy(values.begin(), values.end(), out.mutable_data());
    return out;
}

void covariance_update(CovarianceAccumulator& acc, py::array block) {
    if (block.ndim() != 2 || block.shape(1) != acc.dim())
        throw py::value_error("block must have shape (rows, " + std::to_string(acc.dim()) +
                              "), got " + std::string(py::str(block.attr("shape"))));
    const int64_t rows = block.shape(0);
    if (block.dtype().is(py::dtype::of<float>())) {
        auto a = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(block);
        py::gil_scoped_release nogil;
        acc.update_f32(a.data(), rows);
    } else {
        auto a = py::array_t<double, py::array::c_style | py::array::forcecast>::ensure(block);
        py::gil_scoped_release nogil;
        acc.update_f64(a.data(), rows);
    }
}

py::array_t<int64_t> pfa_removal_order(py::array corr, int64_t n_remove) {
    auto a = py::array_t<double, py::array::c_style | py::array::forcecast>::ensure(corr);
    if (!a || a.ndim() != 2 || a.shape(0) != a.shape(1))
        throw py::value_error("corr must be a square 2-D array, got shape " +
                              std::string(py::str(corr.attr("shape"))));
    const int64_t c = a.shape(0);
    std::vector<int64_t> order;
    {
        py::gil_scoped_release nogil;
        order = l1max_removal_order(a.data(), c, n_remove, PFA_TIE_RTOL);
    }
    py::array_t<int64_t> out(static_cast<py::ssize_t>(order.size()));
    std::copy(order.begin(), order.end(), out.mutable_data());
    return out;
}

}  // namespace

PYBIND11_MODULE(_kernels, m) {
    m.doc() = "pycompress compiled kernels (see pycompress.kernels for the Python API)";
    load_blas();

    py::class_<CovarianceAccumulator>(m, "CovarianceAccumulator")
        .def(py::init<int64_t>(), py::arg("dim"))
        .def("update", &covariance_update, py::arg("block"),
             "Add a (rows, dim) float32/float64 block; accumulation is float64.")
        .def("merge", &CovarianceAccumulator::merge, py::arg("other"))
        .def_property_readonly("dim", &CovarianceAccumulator::dim)
        .def_property_readonly("count", &CovarianceAccumulator::count)
        .def_property_readonly("mean", [](const CovarianceAccumulator& a) {
            return py::array_t<double>(a.dim(), a.mean().data());
        })
        .def_property_readonly("scatter", [](const CovarianceAccumulator& a) {
            return square(a.scatter(), a.dim());
        })
        .def_property_readonly("cov", [](const CovarianceAccumulator& a) {
            if (a.count() < 2) throw py::value_error("covariance needs at least 2 rows");
            return square(a.covariance(), a.dim());
        })
        .def("correlation", [](const CovarianceAccumulator& a, double floor) {
            if (a.count() < 2) throw py::value_error("correlation needs at least 2 rows");
            return square(a.correlation(floor), a.dim());
        }, py::arg("floor") = 1e-8);

    m.attr("PFA_TIE_RTOL") = PFA_TIE_RTOL;
    m.def("l1max_removal_order", &pfa_removal_order, py::arg("corr"), py::arg("n_remove"),
          "PFA 'L1 max' filter selection: the n_remove filters removed from a (C, C) correlation\n"
          "matrix, in removal order (int64). Signs and the diagonal are ignored; O(C^2) in total.");
}
