/* threadctx._ctxread: read a ContextVar in every thread's current context.
 *
 * contexts(var) returns {thread ident: (native thread id, value)} for every
 * thread of the calling interpreter whose current contextvars.Context holds
 * `var`. The current context is the one the thread runs in at this moment,
 * inside contextvars.Context.run (asyncio.to_thread, run_in_executor, AnyIO
 * workers) as well as outside it, which is what makes snapshot() exact.
 *
 * Safety rests on the GIL: another thread changes its PyThreadState.context
 * only while it holds the GIL, and a thread ending unlinks its own state from
 * the interpreter's list with the GIL held, before the state is freed (an
 * embedding application that deletes another thread's state without the GIL
 * is outside this, as it is for every reader of PyThreadState_Next). A state
 * being added meanwhile is linked in complete, with no context yet. The walk itself
 * therefore must not let the GIL go: it calls no Python code and allocates no
 * Python object (an allocation may start the garbage collector, whose
 * finalizers may run Python code that switches threads). It copies each
 * state's id, native id and context (a new reference) into a raw C array;
 * the lookups and the result are built after the walk.
 *
 * Free-threaded builds have no GIL to rely on: the module refuses to load
 * there, and threadctx keeps its pure-Python mirror.
 *
 * It uses the public CPython (non-limited) API only: PyInterpreterState_Get,
 * PyInterpreterState_ThreadHead and PyThreadState_Next ("for advanced
 * debuggers"), and the `thread_id`, `context` and (3.11+) `native_thread_id`
 * fields of PyThreadState from Include/cpython/pystate.h (3.10 to 3.15).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#ifndef Py_GIL_DISABLED

typedef struct {
    unsigned long ident;
    unsigned long native_id;
    PyObject *context; /* a new reference */
} seen_t;

/* The walk: no Python code, no Python allocation (see the top of the file). */
static Py_ssize_t
collect(seen_t **out)
{
    Py_ssize_t size = 0, capacity = 64;
    seen_t *seen = PyMem_RawMalloc(capacity * sizeof(seen_t));
    if (seen == NULL) {
        return -1;
    }
    PyThreadState *state = PyInterpreterState_ThreadHead(PyInterpreterState_Get());
    for (; state != NULL; state = PyThreadState_Next(state)) {
        /* NULL: the thread never used contextvars. A state made for a
           thread not yet started has none either (and on 3.10/3.11 it
           carries its creator's ident until the thread runs). */
        if (state->context == NULL || state->thread_id == 0) {
            continue;
        }
        if (size == capacity) {
            seen_t *grown = PyMem_RawRealloc(seen, 2 * capacity * sizeof(seen_t));
            if (grown == NULL) {
                for (Py_ssize_t i = 0; i < size; i++) {
                    Py_DECREF(seen[i].context);
                }
                PyMem_RawFree(seen);
                return -1;
            }
            seen = grown;
            capacity *= 2;
        }
        seen[size].ident = state->thread_id;
#if PY_VERSION_HEX >= 0x030B0000
        seen[size].native_id = state->native_thread_id;
#else
        seen[size].native_id = 0; /* 3.10 keeps it out of PyThreadState */
#endif
        seen[size].context = Py_NewRef(state->context);
        size++;
    }
    *out = seen;
    return size;
}

static PyObject *
contexts(PyObject *module, PyObject *var)
{
    (void)module;
    if (!PyContextVar_CheckExact(var)) {
        PyErr_SetString(PyExc_TypeError, "contexts() takes a contextvars.ContextVar");
        return NULL;
    }
    PyObject *get_name = PyUnicode_InternFromString("get");
    if (get_name == NULL) {
        return NULL;
    }
    seen_t *seen = NULL;
    Py_ssize_t size = collect(&seen);
    if (size < 0) {
        Py_DECREF(get_name);
        return PyErr_NoMemory();
    }
    PyObject *result = PyDict_New();
    for (Py_ssize_t i = 0; i < size; i++) {
        if (result != NULL) {
            /* args[0] is a spare slot: PY_VECTORCALL_ARGUMENTS_OFFSET lets the callee
               write args[-1] of what it is given, so it must be ours to write. */
            PyObject *args[3] = {NULL, seen[i].context, var};
            /* Context.get(var): None where the context does not hold var. */
            PyObject *value = PyObject_VectorcallMethod(
                get_name, args + 1, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
            PyObject *entry = NULL, *key = NULL;
            if (value != NULL && value != Py_None) {
                entry = Py_BuildValue("(kO)", seen[i].native_id, value);
                key = PyLong_FromUnsignedLong(seen[i].ident);
            }
            if (value == NULL
                || (value != Py_None
                    && (entry == NULL || key == NULL || PyDict_SetItem(result, key, entry) < 0))) {
                Py_CLEAR(result);
            }
            Py_XDECREF(key);
            Py_XDECREF(entry);
            Py_XDECREF(value);
        }
        Py_DECREF(seen[i].context);
    }
    PyMem_RawFree(seen);
    Py_DECREF(get_name);
    return result;
}

static PyMethodDef methods[] = {
    {"contexts", contexts, METH_O,
     "contexts(var) -> {thread ident: (native id, value)} for each thread whose current context holds var."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "threadctx._ctxread",
    .m_doc = "Reads a ContextVar in every thread's current context (GIL builds only).",
    .m_size = -1,
    .m_methods = methods,
};

#endif /* Py_GIL_DISABLED */

PyMODINIT_FUNC
PyInit__ctxread(void)
{
#ifdef Py_GIL_DISABLED
    PyErr_SetString(PyExc_ImportError, "threadctx._ctxread needs the GIL: not for free-threaded builds");
    return NULL;
#else
    return PyModule_Create(&module_def);
#endif
}
