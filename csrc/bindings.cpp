// The only file that knows pybind11: wraps the plain C++ kernels in
// pycompress._kernels. Arrays arrive as contiguous numpy buffers.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <dlfcn.h>
#include <link.h>

#include <string>
#include <vector>

#include "kernels/blas.hpp"
#include "kernels/covariance.hpp"
#include "kernels/pfa_select.hpp"
#include "kernels/gp_acquisition.hpp"
#include "kernels/huffman.hpp"
#include "kernels/kmeans1d.hpp"

namespace py = pybind11;
using namespace pycompress;

namespace {

template <typename Fn>
Fn scipy_blas(const py::dict& capi, const char* name) {
    // cython_blas exports each routine as a PyCapsule named by its C signature.
    py::capsule cap = capi[name].cast<py::capsule>();
    return reinterpret_cast<Fn>(cap.get_pointer());
}

// The BLAS behind scipy.linalg.cython_blas is a private copy of OpenBLAS
// (scipy-openblas: symbols prefixed "scipy_"; numpy ships another one whose
// symbols end in "64_"). Find the loaded library that exports scipy's LP64
// dtrsm and take its thread-count setters, as threadpoolctl does. Any other
// BLAS: the pointers stay null and kernels leave its threading alone.
int collect_library(dl_phdr_info* info, size_t, void* data) {
    if (info->dlpi_name && *info->dlpi_name)
        static_cast<std::vector<std::string>*>(data)->emplace_back(info->dlpi_name);
    return 0;
}

void find_openblas_threads(Blas& b) {
    std::vector<std::string> libraries;
    dl_iterate_phdr(collect_library, &libraries);
    const char* names[][3] = {{"scipy_dtrsm_", "scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"},
                              {"dtrsm_", "openblas_set_num_threads", "openblas_get_num_threads"}};
    for (const auto& path : libraries) {
        if (path.find("openblas") == std::string::npos) continue;
        void* handle = dlopen(path.c_str(), RTLD_LAZY | RTLD_NOLOAD);
        if (!handle) continue;
        for (const auto& n : names) {
            void* set = dlsym(handle, n[1]);
            void* get = dlsym(handle, n[2]);
            if (dlsym(handle, n[0]) && set && get) {
                b.set_num_threads = reinterpret_cast<blas_set_threads_t>(set);
                b.get_num_threads = reinterpret_cast<blas_get_threads_t>(get);
                dlclose(handle);
                return;
            }
        }
        dlclose(handle);
    }
}

void load_blas() {
    py::dict capi = py::module_::import("scipy.linalg.cython_blas").attr("__pyx_capi__");
    Blas& b = blas();
    b.ssyrk = scipy_blas<ssyrk_t>(capi, "ssyrk");
    b.dsyrk = scipy_blas<dsyrk_t>(capi, "dsyrk");
    b.dgemm = scipy_blas<dgemm_t>(capi, "dgemm");
    b.dtrsm = scipy_blas<dtrsm_t>(capi, "dtrsm");
    b.dtrmm = scipy_blas<dtrmm_t>(capi, "dtrmm");
    find_openblas_threads(b);
}

py::array_t<double> square(const std::vector<double>& values, int64_t d) {
    py::array_t<double> out({d, d});
    std::copy(values.begin(), values.end(), out.mutable_data());
    return out;
}

// Rows may be strided (a slice of a larger array, a column subset of rows is
// not): the kernel reads rows in place when the elements of a row are
// contiguous, and only other layouts (or other dtypes) are copied first.
template <typename T>
bool update_in_place(CovarianceAccumulator& acc, const py::array& block, int64_t rows) {
    if (!block.dtype().is(py::dtype::of<T>())) return false;
    const auto item = static_cast<py::ssize_t>(sizeof(T));
    if (block.shape(1) > 1 && block.strides(1) != item) return false;
    if (rows > 1 && (block.strides(0) < block.shape(1) * item || block.strides(0) % item != 0)) return false;
    const int64_t stride = rows > 1 ? block.strides(0) / item : acc.dim();
    const T* data = static_cast<const T*>(block.data());
    py::gil_scoped_release nogil;
    if constexpr (sizeof(T) == 4)
        acc.update_f32(data, rows, stride);
    else
        acc.update_f64(data, rows, stride);
    return true;
}

void covariance_update(CovarianceAccumulator& acc, py::array block) {
    if (block.ndim() != 2 || block.shape(1) != acc.dim())
        throw py::value_error("block must have shape (rows, " + std::to_string(acc.dim()) +
                              "), got " + std::string(py::str(block.attr("shape"))));
    const int64_t rows = block.shape(0);
    if (rows == 0) return;
    if (update_in_place<float>(acc, block, rows) || update_in_place<double>(acc, block, rows)) return;
    if (block.dtype().is(py::dtype::of<float>())) {
        auto a = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(block);
        update_in_place<float>(acc, a, rows);
    } else {
        auto a = py::array_t<double, py::array::c_style | py::array::forcecast>::ensure(block);
        update_in_place<double>(acc, a, rows);
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

using Array64 = py::array_t<double, py::array::c_style | py::array::forcecast>;

Array64 as_matrix(const py::handle& obj, const char* name, int64_t cols) {
    Array64 a = Array64::ensure(obj);
    if (!a || a.ndim() != 2 || (cols >= 0 && a.shape(1) != cols))
        throw py::value_error(std::string(name) + " must be a 2-D float array" +
                              (cols >= 0 ? " with " + std::to_string(cols) + " columns" : ""));
    return a;
}

Array64 as_vector(const py::handle& obj, const char* name, int64_t size) {
    Array64 a = Array64::ensure(obj);
    if (!a || a.ndim() != 1 || a.shape(0) != size)
        throw py::value_error(std::string(name) + " must be a 1-D float array of length " + std::to_string(size));
    return a;
}

py::tuple gp_acquisition(const py::object& candidates, const py::object& train_x, const py::object& lengthscales,
                         double outputscale, double mean_constant, const py::object& chol, const py::object& beta,
                         const py::object& incumbent, double delta, double var_floor, int threads) {
    Array64 x = as_matrix(train_x, "train_x", -1);
    const int64_t n = x.shape(0), d = x.shape(1);
    Array64 c = as_matrix(candidates, "candidates", d);
    Array64 l = as_matrix(chol, "chol", n);
    if (l.shape(0) != n) throw py::value_error("chol must be n x n with n = len(train_x)");
    Array64 ls = as_vector(lengthscales, "lengthscales", d);
    Array64 bt = as_vector(beta, "beta", n);
    Array64 inc = as_vector(incumbent, "incumbent", d);
    const int64_t m = c.shape(0);
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
        gp_pac_scores(gp, c.data(), m, inc.data(), delta, var_floor, out, &mu_hat, &var_hat, threads);
    }
    return py::make_tuple(z, mu, var, cov);
}

py::tuple kmeans1d_py(py::array values, int clusters, int64_t max_iter) {
    auto a = py::array_t<float, py::array::c_style | py::array::forcecast>::ensure(values);
    if (!a) throw py::value_error("kmeans1d: values must be a numeric array");
    KMeans1D result;
    {
        py::gil_scoped_release nogil;
        result = kmeans1d(a.data(), static_cast<int64_t>(a.size()), clusters, max_iter);
    }
    py::array_t<float> codebook(static_cast<py::ssize_t>(result.codebook.size()), result.codebook.data());
    std::vector<py::ssize_t> shape(a.shape(), a.shape() + a.ndim());
    py::array_t<uint8_t> indices(shape);
    std::copy(result.indices.begin(), result.indices.end(), indices.mutable_data());
    return py::make_tuple(codebook, indices, result.iterations, result.converged);
}

CodeLengths lengths_from(py::array lengths) {
    auto a = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>::ensure(lengths);
    if (!a || a.ndim() != 1 || a.size() != 256) throw py::value_error("huffman: lengths must be 256 uint8 values");
    CodeLengths out{};
    std::copy(a.data(), a.data() + 256, out.begin());
    return out;
}

py::array_t<uint8_t> huffman_code_lengths_py(py::array counts) {
    auto a = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>::ensure(counts);
    if (!a || a.ndim() != 1 || a.size() != 256) throw py::value_error("huffman: counts must be 256 values");
    std::array<uint64_t, 256> c{};
    std::copy(a.data(), a.data() + 256, c.begin());
    const CodeLengths lengths = huffman_code_lengths(c);
    return py::array_t<uint8_t>(256, lengths.data());
}

py::bytes huffman_encode_py(py::array symbols, py::array lengths) {
    if (!symbols.dtype().is(py::dtype::of<uint8_t>())) throw py::value_error("huffman: symbols must be uint8");
    auto s = py::array_t<uint8_t, py::array::c_style>::ensure(symbols);
    const CodeLengths l = lengths_from(lengths);
    std::vector<uint8_t> out;
    {
        py::gil_scoped_release nogil;
        out = huffman_encode(s.data(), static_cast<int64_t>(s.size()), l);
    }
    return py::bytes(reinterpret_cast<const char*>(out.data()), out.size());
}

py::array_t<uint8_t> huffman_decode_py(py::buffer payload, py::array lengths, int64_t count) {
    py::buffer_info info = payload.request();
    if (info.itemsize != 1 || info.ndim > 1) throw py::value_error("huffman: payload must be bytes");
    const CodeLengths l = lengths_from(lengths);
    std::vector<uint8_t> out;
    {
        py::gil_scoped_release nogil;
        out = huffman_decode(static_cast<const uint8_t*>(info.ptr), static_cast<int64_t>(info.size), l, count);
    }
    py::array_t<uint8_t> result(static_cast<py::ssize_t>(out.size()));
    std::copy(out.begin(), out.end(), result.mutable_data());
    return result;
}

}  // namespace

PYBIND11_MODULE(_kernels, m) {
    m.doc() = "pycompress compiled kernels (see pycompress.kernels for the Python API)";
    load_blas();

    py::class_<CovarianceAccumulator>(m, "CovarianceAccumulator")
        .def(py::init<int64_t>(), py::arg("dim"))
        .def("update", &covariance_update, py::arg("block"),
             "Add a (rows, dim) float32/float64 block; accumulation is float64. ValueError on NaN/inf.")
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
    m.def("gp_acquisition", &gp_acquisition, py::arg("candidates"), py::arg("train_x"), py::arg("lengthscales"),
          py::arg("outputscale"), py::arg("mean_constant"), py::arg("chol"), py::arg("beta"), py::arg("incumbent"),
          py::arg("delta"), py::arg("var_floor") = 1e-12, py::arg("threads") = 0,
          "PAC scores (z, mu, var, cov) of M candidates against the incumbent; see pycompress.kernels.reference.");
    m.def("kmeans1d", &kmeans1d_py, py::arg("values"), py::arg("clusters"), py::arg("max_iter") = 10000,
          "1-D k-means, linear init, Lloyd to convergence: (codebook[K] f32, indices u8 like values, "
          "iterations, converged).");
    m.def("huffman_code_lengths", &huffman_code_lengths_py, py::arg("counts"),
          "Huffman code lengths (uint8[256]) for symbol counts[256].");
    m.def("huffman_encode", &huffman_encode_py, py::arg("symbols"), py::arg("lengths"),
          "Canonical Huffman encoding of a uint8 array -> bytes (MSB first).");
    m.def("huffman_decode", &huffman_decode_py, py::arg("payload"), py::arg("lengths"), py::arg("count"),
          "Decode `count` symbols; ValueError on corrupted or truncated input.");
}
