// fusedrl.engine._rollout: packed variable-length rollout buffer and micro-batch planning.
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_rollout, m) {
    m.doc() = "fusedrl packed rollout buffer (C++)";
    m.attr("__version__") = "0.1.0";
}
