// Sample-index and blend-index builders for megatron_lite.data (pybind11, 64-bit indices).
//
// Semantics follow Megatron-LM's megatron/core/datasets/helpers.cpp (build_sample_idx and
// build_blending_indices); this is an independent implementation. NumPy references live in
// megatron_lite/data/helpers.py and tests prove both equal.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

// sample_idx[i] = (position in doc_idx, token offset in that document) where sample i starts;
// sample i spans that start up to and including the start of sample i + 1, i.e. seq_length + 1
// tokens, so consecutive samples overlap by one token. Zero-length documents are skipped.
template <typename DocT>
static py::array_t<int64_t> build_sample_idx_impl(const py::array_t<int32_t, py::array::c_style>& sizes_,
                                                  const py::array_t<DocT, py::array::c_style>& doc_idx_,
                                                  int64_t seq_length, int64_t num_samples) {
  if (seq_length <= 0) throw std::invalid_argument("seq_length must be positive");
  if (num_samples < 0) throw std::invalid_argument("num_samples must be >= 0");
  const int32_t* sizes = sizes_.data();
  const DocT* doc_idx = doc_idx_.data();
  const int64_t n_sizes = sizes_.shape(0);
  const int64_t n_doc = doc_idx_.shape(0);
  py::array_t<int64_t> out({num_samples + 1, static_cast<int64_t>(2)});
  int64_t* s = out.mutable_data();
  // Errors are detected inside the single pass (a separate validation pass would double the
  // random reads of `sizes`, which dominate the run time for shuffled document orders).
  int err = 0;
  int64_t k = 0;
  {
    py::gil_scoped_release release;
    int64_t offset = 0;
    s[0] = 0;
    s[1] = 0;
    for (int64_t i = 1; i <= num_samples && !err; ++i) {
      int64_t remaining = seq_length + 1;
      while (remaining != 0) {
        if (k >= n_doc) { err = 1; break; }
        const int64_t d = static_cast<int64_t>(doc_idx[k]);
        if (d < 0 || d >= n_sizes) { err = 2; break; }
        if (k + 16 < n_doc) __builtin_prefetch(sizes + doc_idx[k + 16]);  // hide the random read latency
        const int64_t len = static_cast<int64_t>(sizes[d]) - offset;
        remaining -= len;
        if (remaining <= 0) {
          // The sample ends inside this document; the next one starts on its last token.
          offset += remaining + len - 1;
          remaining = 0;
        } else {
          ++k;
          offset = 0;
        }
      }
      s[2 * i] = k;
      s[2 * i + 1] = offset;
    }
  }
  if (err == 2) throw std::out_of_range("doc_idx entry " + std::to_string(k) + " out of range of sizes");
  if (err == 1) {
    int64_t total = 0;
    for (int64_t j = 0; j < n_doc; ++j) total += sizes[doc_idx[j]];
    throw std::invalid_argument("documents hold " + std::to_string(total) + " tokens, fewer than the " +
                                std::to_string(num_samples * seq_length + 1) + " that " +
                                std::to_string(num_samples) + " samples need");
  }
  return out;
}

static py::array build_sample_idx(py::array sizes, py::array doc_idx, int64_t seq_length, int64_t num_samples) {
  auto sz = py::array_t<int32_t, py::array::c_style | py::array::forcecast>::ensure(sizes);
  if (!sz || sz.ndim() != 1) throw std::invalid_argument("sizes must be a 1-D int32 array");
  if (py::dtype::of<int32_t>().is(doc_idx.dtype()))
    return build_sample_idx_impl<int32_t>(sz, py::array_t<int32_t, py::array::c_style>::ensure(doc_idx),
                                          seq_length, num_samples);
  auto di = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(doc_idx);
  if (!di || di.ndim() != 1) throw std::invalid_argument("doc_idx must be a 1-D integer array");
  return build_sample_idx_impl<int64_t>(sz, di, seq_length, num_samples);
}

// Greedy interleave: position i goes to the source with the largest
// weight * max(i, 1) - count (ties: lowest index), as in Megatron-LM;
// sources of weight 0 are skipped. `counts` are the samples
// already taken from each source before this segment; the error term uses counts taken within
// the segment, and returned sample indices continue from `counts`.
static py::tuple build_blending_indices(py::array_t<double, py::array::c_style | py::array::forcecast> weights_,
                                        int64_t size,
                                        py::array_t<int64_t, py::array::c_style | py::array::forcecast> counts_) {
  const int64_t n = weights_.shape(0);
  if (n <= 0 || n > 32767) throw std::invalid_argument("need 1..32767 datasets");
  if (counts_.shape(0) != n) throw std::invalid_argument("counts must have one entry per dataset");
  if (size < 0) throw std::invalid_argument("size must be >= 0");
  const double* w = weights_.data();
  bool any_positive = false;
  for (int64_t j = 0; j < n; ++j) any_positive = any_positive || w[j] > 0.0;
  if (!any_positive) throw std::invalid_argument("at least one blend weight must be positive");
  const int64_t* c0 = counts_.data();
  py::array_t<int16_t> ds_index(size);
  py::array_t<int64_t> ds_sample(size);
  int16_t* di = ds_index.mutable_data();
  int64_t* dsi = ds_sample.mutable_data();
  {
    py::gil_scoped_release release;
    std::vector<int64_t> taken(n, 0);
    for (int64_t i = 0; i < size; ++i) {
      const double x = i > 1 ? static_cast<double>(i) : 1.0;
      // Zero-weight sources are never picked: with max(i, 1) a source of weight 0 would tie at
      // i == 1 (error 0) with a just-used source, and ties go to the lowest index.
      int64_t best = -1;
      double best_err = 0.0;
      for (int64_t j = 0; j < n; ++j) {
        if (!(w[j] > 0.0)) continue;
        const double err = w[j] * x - static_cast<double>(taken[j]);
        if (best < 0 || err > best_err) {
          best_err = err;
          best = j;
        }
      }
      di[i] = static_cast<int16_t>(best);
      dsi[i] = c0[best] + taken[best];
      ++taken[best];
    }
  }
  return py::make_tuple(ds_index, ds_sample);
}

PYBIND11_MODULE(_data_helpers, m) {
  m.doc() = "megatron_lite data index builders (sample index, blending index)";
  m.def("build_sample_idx", &build_sample_idx, py::arg("sizes"), py::arg("doc_idx"), py::arg("seq_length"),
        py::arg("num_samples"));
  m.def("build_blending_indices", &build_blending_indices, py::arg("weights"), py::arg("size"),
        py::arg("counts"));
}
