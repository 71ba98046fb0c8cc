// SPDX-License-Identifier: GPL-2.0-only
/*
 * kvmpy._stats_snapshot: Stats.snapshot() in C, with the CPython C API.
 *
 * A snapshot is one pread of a stats fd's data block kept as a bytes object
 * plus the layout that decodes it (kvmpy/stats.py). In Python the call, the
 * object and its two attribute stores cost more than the pread itself; cffi
 * cannot make Python objects, so this small module does, and nothing else.
 *
 *   SnapshotBase    the fields of kvmpy.stats.Snapshot: _layout and _data
 *                   (read-only, set here) and _values (decoded values or a
 *                   user's mapping, set from Python).
 *   SnapshotReader  the callable behind Stats.snapshot: (fd, data offset,
 *                   layout, snapshot class, owner name, failure callback).
 *                   close() makes it refuse to read; the fd belongs to Stats.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <errno.h>
#include <unistd.h>

#if PY_VERSION_HEX < 0x030A0000		/* pyproject.toml allows 3.9 */
static inline PyObject *Py_NewRef(PyObject *obj)
{
	Py_INCREF(obj);
	return obj;
}

static int PyModule_AddObjectRef(PyObject *module, const char *name, PyObject *value)
{
	Py_INCREF(value);
	if (PyModule_AddObject(module, name, value) < 0) {
		Py_DECREF(value);
		return -1;
	}
	return 0;
}
#endif

typedef struct {
	PyObject_HEAD
	PyObject *layout;
	PyObject *data;
	PyObject *values;
} SnapshotBase;

static int base_traverse(SnapshotBase *self, visitproc visit, void *arg)
{
	Py_VISIT(self->layout);
	Py_VISIT(self->data);
	Py_VISIT(self->values);
	return 0;
}

static int base_clear(SnapshotBase *self)
{
	Py_CLEAR(self->layout);
	Py_CLEAR(self->data);
	Py_CLEAR(self->values);
	return 0;
}

/* A Python subclass's dealloc (subtype_dealloc) untracks, visits and releases its type. */
static void base_dealloc(SnapshotBase *self)
{
	PyObject_GC_UnTrack(self);
	base_clear(self);
	Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef base_members[] = {
	{"_layout", T_OBJECT_EX, offsetof(SnapshotBase, layout), READONLY,
	 "the StatsLayout that decodes _data (unset for a snapshot made from values)"},
	{"_data", T_OBJECT_EX, offsetof(SnapshotBase, data), READONLY,
	 "the data block as read (unset for a snapshot made from values)"},
	{"_values", T_OBJECT_EX, offsetof(SnapshotBase, values), 0,
	 "stat name -> value, once decoded (or as given)"},
	{NULL},
};

static PyTypeObject SnapshotBaseType = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "kvmpy._stats_snapshot.SnapshotBase",
	.tp_doc = "The fields of kvmpy.stats.Snapshot.",
	.tp_basicsize = sizeof(SnapshotBase),
	.tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
	.tp_new = PyType_GenericNew,
	.tp_dealloc = (destructor)base_dealloc,
	.tp_traverse = (traverseproc)base_traverse,
	.tp_clear = (inquiry)base_clear,
	.tp_members = base_members,
};

typedef struct {
	PyObject_HEAD
	int fd;			/* -1 once closed */
	Py_ssize_t size;	/* of the data block; 0 until the first read asks the layout */
	long long offset;	/* of the data block in the fd */
	PyObject *layout;
	PyTypeObject *cls;	/* a subclass of SnapshotBase */
	PyObject *owner;	/* for error messages */
	PyObject *fail;		/* fail(owner, closed, errno, got, size) raises the error */
} SnapshotReader;

static int reader_traverse(SnapshotReader *self, visitproc visit, void *arg)
{
	Py_VISIT(self->layout);
	Py_VISIT(self->cls);
	Py_VISIT(self->owner);
	Py_VISIT(self->fail);
	return 0;
}

static int reader_clear(SnapshotReader *self)
{
	self->fd = -1;
	Py_CLEAR(self->layout);
	Py_CLEAR(self->cls);
	Py_CLEAR(self->owner);
	Py_CLEAR(self->fail);
	return 0;
}

static void reader_dealloc(SnapshotReader *self)
{
	PyObject_GC_UnTrack(self);
	reader_clear(self);
	Py_TYPE(self)->tp_free((PyObject *)self);
}

static int reader_init(SnapshotReader *self, PyObject *args, PyObject *kwds)
{
	static char *kwlist[] = {"fd", "offset", "layout", "cls", "owner", "fail", NULL};
	PyObject *layout, *cls, *owner, *fail;
	long long offset;
	int fd;

	if (!PyArg_ParseTupleAndKeywords(args, kwds, "iLOO!UO:SnapshotReader", kwlist, &fd, &offset,
					 &layout, &PyType_Type, &cls, &owner, &fail))
		return -1;
	if (!PyType_IsSubtype((PyTypeObject *)cls, &SnapshotBaseType)) {
		PyErr_SetString(PyExc_TypeError, "SnapshotReader: cls must be a subclass of SnapshotBase");
		return -1;
	}
	if (fd < 0 || offset < 0) {
		PyErr_SetString(PyExc_ValueError, "SnapshotReader: fd and offset must be >= 0");
		return -1;
	}
	if (!PyCallable_Check(fail)) {
		PyErr_SetString(PyExc_TypeError, "SnapshotReader: fail must be callable");
		return -1;
	}
	reader_clear(self);
	self->fd = fd;
	self->offset = offset;
	self->size = 0;
	self->layout = Py_NewRef(layout);
	self->cls = (PyTypeObject *)Py_NewRef(cls);
	self->owner = Py_NewRef(owner);
	self->fail = Py_NewRef(fail);
	return 0;
}

/* Raise the error fail() makes of a failed read. */
static PyObject *reader_fail(SnapshotReader *self, int closed, int err, Py_ssize_t got)
{
	PyObject *r = PyObject_CallFunction(self->fail, "OiinN", self->owner, closed, err, got,
					    PyLong_FromSsize_t(self->size));

	if (r) {
		Py_DECREF(r);
		PyErr_SetString(PyExc_SystemError, "SnapshotReader: fail() returned instead of raising");
	}
	return NULL;
}

static PyObject *reader_call(SnapshotReader *self, PyObject *args, PyObject *kwds)
{
	SnapshotBase *snap;
	PyObject *data;
	ssize_t got;

	if (PyTuple_GET_SIZE(args) || (kwds && PyDict_GET_SIZE(kwds))) {
		PyErr_SetString(PyExc_TypeError, "snapshot() takes no arguments");
		return NULL;
	}
	if (!self->fail) {
		PyErr_SetString(PyExc_ValueError, "SnapshotReader: not initialised");
		return NULL;
	}
	if (!self->size && self->fd >= 0) {	/* parses the descriptors: once per layout, not per fd */
		PyObject *size = PyObject_GetAttrString(self->layout, "data_size");

		if (!size)
			return NULL;
		self->size = PyLong_AsSsize_t(size);
		Py_DECREF(size);
		if (self->size < 0) {
			self->size = 0;
			if (!PyErr_Occurred())
				PyErr_SetString(PyExc_ValueError, "SnapshotReader: negative data_size");
			return NULL;
		}
	}
	data = PyBytes_FromStringAndSize(NULL, self->size);
	if (!data)
		return NULL;
	/*
	 * Checked last: data_size and the allocation (a GC pass) can run Python code, and
	 * another thread with it. From here to the pread the GIL stays held: a stats read
	 * copies counters and does not block, and no other thread can close (and reuse)
	 * the fd meanwhile.
	 */
	if (self->fd < 0) {
		Py_DECREF(data);
		return reader_fail(self, 1, EBADF, 0);
	}
	got = pread(self->fd, PyBytes_AS_STRING(data), self->size, self->offset);
	if (got != self->size) {
		int err = got < 0 ? errno : 0;

		Py_DECREF(data);
		return reader_fail(self, 0, err, got < 0 ? 0 : got);
	}
	snap = (SnapshotBase *)self->cls->tp_alloc(self->cls, 0);
	if (!snap) {
		Py_DECREF(data);
		return NULL;
	}
	snap->layout = Py_NewRef(self->layout);
	snap->data = data;
	return (PyObject *)snap;
}

static PyObject *reader_close(SnapshotReader *self, PyObject *unused)
{
	self->fd = -1;
	Py_RETURN_NONE;
}

static PyObject *reader_get_closed(SnapshotReader *self, void *closure)
{
	return PyBool_FromLong(self->fd < 0);
}

static PyMethodDef reader_methods[] = {
	{"close", (PyCFunction)reader_close, METH_NOARGS,
	 "Refuse further reads (the caller closes the fd)."},
	{NULL},
};

static PyGetSetDef reader_getset[] = {
	{"closed", (getter)reader_get_closed, NULL, "close() was called.", NULL},
	{NULL},
};

static PyTypeObject SnapshotReaderType = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "kvmpy._stats_snapshot.SnapshotReader",
	.tp_doc = "snapshot() -> Snapshot: all stats, read with one pread.",
	.tp_basicsize = sizeof(SnapshotReader),
	.tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
	.tp_new = PyType_GenericNew,
	.tp_init = (initproc)reader_init,
	.tp_call = (ternaryfunc)reader_call,
	.tp_dealloc = (destructor)reader_dealloc,
	.tp_traverse = (traverseproc)reader_traverse,
	.tp_clear = (inquiry)reader_clear,
	.tp_methods = reader_methods,
	.tp_getset = reader_getset,
};

static struct PyModuleDef stats_snapshot_module = {
	PyModuleDef_HEAD_INIT,
	.m_name = "kvmpy._stats_snapshot",
	.m_doc = "Stats.snapshot() in C (see kvmpy/stats.py).",
	.m_size = -1,
};

PyMODINIT_FUNC PyInit__stats_snapshot(void)
{
	PyObject *m;

	if (PyType_Ready(&SnapshotBaseType) < 0 || PyType_Ready(&SnapshotReaderType) < 0)
		return NULL;
	m = PyModule_Create(&stats_snapshot_module);
	if (!m)
		return NULL;
	if (PyModule_AddObjectRef(m, "SnapshotBase", (PyObject *)&SnapshotBaseType) < 0 ||
	    PyModule_AddObjectRef(m, "SnapshotReader", (PyObject *)&SnapshotReaderType) < 0) {
		Py_DECREF(m);
		return NULL;
	}
	return m;
}
