// The usual call's dispatch checks, told in C++: each module dict read and tensor attribute costs
// nanoseconds here against Python's ~30-100 ns, and a converted nn.Sequential's run of Linears
// (manualbp/chain.py: _flat) reads a dozen of them per layer on every forward.
//
// Each function here confirms the usual call only: it gives exactly what its Python twin gives
// when that twin would serve the call, and None for anything else, where the Python twin then
// decides (and says why, or declines). So these checks may be stricter than Python's, never
// looser; the Python stays the reference and the fallback without the C++ core.
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>


namespace manualbp {

using at::Tensor;

namespace {

// The dict keys read here, each interned once (PyDict_GetItemString would build and hash a new
// str per read, most of the cost).
struct Keys {
  PyObject *parameters, *modules, *activation, *rule, *compiled, *forward, *weight, *bias;
  PyObject* hooks[4];
};

const Keys& keys() {
  static const Keys k = [] {  // first use holds the GIL
    auto s = [](const char* name) { return PyUnicode_InternFromString(name); };
    return Keys{s("_parameters"), s("_modules"), s("activation"), s("rule"),
                s("_compiled_call_impl"), s("forward"), s("weight"), s("bias"),
                {s("_forward_hooks"), s("_forward_pre_hooks"), s("_backward_hooks"),
                 s("_backward_pre_hooks")}};
  }();
  return k;
}

// d[key] when d holds it (borrowed), else nullptr.
PyObject* item(PyObject* d, PyObject* key) { return PyDict_GetItem(d, key); }

// Whether d[key] is an empty dict (a module's hook or submodule dict), the usual value.
bool empty_dict(PyObject* d, PyObject* key) {
  PyObject* v = item(d, key);
  return v != nullptr && PyDict_Check(v) && PyDict_GET_SIZE(v) == 0;
}

// Whether none of a module's four hook dicts holds a hook.
bool no_hooks(PyObject* d) {
  for (PyObject* key : keys().hooks) {
    if (!empty_dict(d, key)) return false;
  }
  return true;
}

bool real_dtype(at::ScalarType t) {  // chain.py's _DTYPES
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

// One Linear of the run, as chain.py's _flat reads it: (W, b or None, activation) appended, the
// width carried on; false where the Python twin is to decide.
bool take_layer(PyObject* m, at::ScalarType dtype, int64_t& width, py::list& params,
                py::list& activations, py::list& layers) {
  PyObject* d = PyObject_GenericGetDict(m, nullptr);  // new reference
  if (d == nullptr) {
    PyErr_Clear();
    return false;
  }
  py::object dict = py::reinterpret_steal<py::object>(d);
  const Keys& k = keys();
  PyObject* own = item(d, k.parameters);
  PyObject* act = item(d, k.activation);
  PyObject* rule = item(d, k.rule);
  PyObject* compiled = item(d, k.compiled);
  if (own == nullptr || !PyDict_Check(own) || act == nullptr || !PyUnicode_CheckExact(act) ||
      (rule != nullptr && !(PyUnicode_Check(rule) &&
                            PyUnicode_CompareWithASCIIString(rule, "backprop") == 0)) ||
      !empty_dict(d, k.modules) || item(d, k.forward) != nullptr || !no_hooks(d) ||
      (compiled != nullptr && compiled != Py_None)) {
    return false;  // computed weight, patched forward, compiled, another rule, hooks, ...
  }
  for (auto layer : layers) {
    if (layer.ptr() == m) return false;  // a layer twice in the run
  }
  PyObject* W = item(own, k.weight);
  PyObject* b = item(own, k.bias);
  if (W == nullptr || b == nullptr || !THPVariable_Check(W)) return false;
  const Tensor& w = THPVariable_Unpack(W);
  if (w.is_nested() || w.layout() != at::kStrided || w.scalar_type() != dtype || w.dim() != 2 ||
      w.size(1) != width) {
    return false;
  }
  width = w.size(0);
  if (b != Py_None) {
    if (!THPVariable_Check(b)) return false;
    const Tensor& bias = THPVariable_Unpack(b);
    if (bias.is_nested() || bias.scalar_type() != dtype || bias.dim() != 1 ||
        bias.size(0) != width) {
      return false;
    }
  }
  params.append(py::handle(W));
  params.append(py::handle(b));
  activations.append(py::handle(act));
  layers.append(py::handle(m));
  return true;
}

}  // namespace

// chain.py's _flat(run, x) for the usual run: (params W1, b1, ..., activations, layers,
// "backprop") when every module is a manualbp.Linear or an nn.Identity (identity: that type)
// with no hooks, its own Parameters, widths that chain and x's dtype; else None (the Python
// _flat then decides). Rules other than backprop are left to the Python twin.
py::object chain_flat(py::list run, py::handle x, py::handle identity) {
  if (Py_TYPE(x.ptr()) != reinterpret_cast<PyTypeObject*>(THPVariableClass)) return py::none();
  const Tensor& input = THPVariable_Unpack(x.ptr());
  if (input.is_nested() || input.layout() != at::kStrided) return py::none();
  const at::ScalarType dtype = input.scalar_type();
  if (!real_dtype(dtype) || input.dim() == 0 || (input.dim() > 2 && !input.is_contiguous())) {
    return py::none();
  }
  int64_t width = input.size(-1);
  py::list params, activations, layers;
  for (auto m : run) {
    if (Py_TYPE(m.ptr()) == reinterpret_cast<PyTypeObject*>(identity.ptr())) {
      PyObject* d = PyObject_GenericGetDict(m.ptr(), nullptr);
      if (d == nullptr) {
        PyErr_Clear();
        return py::none();
      }
      py::object dict = py::reinterpret_steal<py::object>(d);
      if (!no_hooks(d)) return py::none();
      continue;
    }
    if (!take_layer(m.ptr(), dtype, width, params, activations, layers)) return py::none();
  }
  if (py::len(layers) < 2) return py::none();
  return py::make_tuple(params, py::tuple(activations), layers, py::str("backprop"));
}

// MLP._flat and check_linear_args' usual call in one (mlp.py: MLP._run): ([W1, b1, ...],
// activations) when every layer (layers: the ModuleList's _modules) holds its own weight and a
// bias entry, has no hooks (forward or backward: MLP never calls a layer) and an activation
// name, and x is a dense real tensor of layer 1's dtype and input width (a bias, if any, of
// layer 1's dtype and output width); else None (the Python _flat and checks then decide, and
// say why).
py::object mlp_flat(py::handle layers, py::handle x) {
  if (!PyDict_CheckExact(layers.ptr()) || !THPVariable_Check(x.ptr())) return py::none();
  const Keys& k = keys();
  py::list params, activations_list;
  PyObject *key, *layer;
  Py_ssize_t pos = 0;
  while (PyDict_Next(layers.ptr(), &pos, &key, &layer)) {
    PyObject* d = PyObject_GenericGetDict(layer, nullptr);  // new reference
    if (d == nullptr) {
      PyErr_Clear();
      return py::none();
    }
    py::object dict = py::reinterpret_steal<py::object>(d);
    PyObject* own = item(d, k.parameters);
    PyObject* act = item(d, k.activation);
    if (own == nullptr || !PyDict_Check(own) || act == nullptr || !PyUnicode_CheckExact(act) ||
        !no_hooks(d)) {
      return py::none();  // hooks (never run), or no activation of its own: MLP._flat says
    }
    PyObject* W = item(own, k.weight);
    PyObject* b = item(own, k.bias);
    if (W == nullptr || W == Py_None || b == nullptr) return py::none();  // a parametrization
    params.append(py::handle(W));
    params.append(py::handle(b));
    activations_list.append(py::handle(act));
  }
  if (py::len(params) == 0) return py::none();
  // check_linear_args' usual call, on layer 1
  PyObject* W = PyList_GET_ITEM(params.ptr(), 0);
  PyObject* b = PyList_GET_ITEM(params.ptr(), 1);
  const Tensor& input = THPVariable_Unpack(x.ptr());
  if (!THPVariable_Check(W) || input.is_nested()) return py::none();
  const Tensor& w = THPVariable_Unpack(W);
  const at::ScalarType dtype = w.scalar_type();
  if (input.scalar_type() != dtype || !real_dtype(dtype) || w.dim() != 2 || input.dim() == 0 ||
      input.size(-1) != w.size(1) || input.layout() != at::kStrided ||
      w.layout() != at::kStrided) {
    return py::none();
  }
  if (b != Py_None) {
    if (!THPVariable_Check(b)) return py::none();
    const Tensor& bias = THPVariable_Unpack(b);
    if (bias.scalar_type() != dtype || bias.dim() != 1 || bias.size(0) != w.size(0)) {
      return py::none();
    }
  }
  return py::make_tuple(params, py::tuple(activations_list));
}

void bind_dispatch(py::module_& m) {
  m.def("chain_flat", &chain_flat, py::arg("run"), py::arg("x"), py::arg("identity"));
  m.def("mlp_flat", &mlp_flat, py::arg("layers"), py::arg("x"));
}

}  // namespace manualbp
