/* Per-transaction accounting for the relay: request and transaction times into a pool's
 * accumulators and latency histograms in one call (see account.py, the pure-Python twin and the
 * layout of the bytearrays). A profile showed the same work in Python costing ~15 % of the
 * pooler's instructions per transaction; here it is one call of a few hundred instructions. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

/* must match account.py */
#define NB 97 /* buckets per histogram: 96 bounds + overflow */
enum { Q_TIME, Q_MAX, X_TIME, X_MAX, W_TIME, W_MAX, ACC_N };
enum { H_XACT = 0, H_QUERY = NB, H_WAIT = 2 * NB };

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* The bucket of a duration: bounds are 1e-5 * 2**(i/4), i = 0..95 (the table stats.py's BOUNDS
 * holds, computed by the same pow); bucket i holds (bound[i-1], bound[i]], bucket 0 everything up
 * to 1e-5, bucket 96 the rest. The float's exponent and top two mantissa bits of seconds/1e-5
 * give the index to within two (log2(1 + f) lies in [f, f + 0.086]), and the exact table
 * comparisons settle it: a dozen instructions where log2 cost ~50. */
static double bounds[NB - 1];

static int bucket(double seconds)
{
    if (!(seconds > bounds[0]))
        return 0;
    if (!(seconds <= bounds[NB - 2]))
        return NB - 1;
    double scaled = seconds * 1e5;
    uint64_t bits;
    memcpy(&bits, &scaled, sizeof bits);
    int i = 4 * ((int)((bits >> 52) & 0x7ff) - 1023) + (int)((bits >> 50) & 3);
    if (i < 1)
        i = 1;
    if (i > NB - 2)
        i = NB - 2;
    while (bounds[i] < seconds)
        i++;
    while (i > 1 && bounds[i - 1] >= seconds)
        i--;
    return i;
}

static int buffers(PyObject *const *args, double **times, double **acc, int64_t **hist)
{
    for (int i = 0; i < 3; i++)
        if (!PyByteArray_CheckExact(args[i])) {
            PyErr_SetString(PyExc_TypeError, "bytearrays expected");
            return -1;
        }
    if (PyByteArray_GET_SIZE(args[0]) < 16 || PyByteArray_GET_SIZE(args[1]) < ACC_N * 8 ||
        PyByteArray_GET_SIZE(args[2]) < 3 * NB * 8) {
        PyErr_SetString(PyExc_ValueError, "accounting buffers too small");
        return -1;
    }
    *times = (double *)PyByteArray_AS_STRING(args[0]);
    *acc = (double *)PyByteArray_AS_STRING(args[1]);
    *hist = (int64_t *)PyByteArray_AS_STRING(args[2]);
    return 0;
}

/* begin(times): a client request begins (and a transaction, if none is open). */
static PyObject *begin(PyObject *self, PyObject *times_obj)
{
    if (!PyByteArray_CheckExact(times_obj) || PyByteArray_GET_SIZE(times_obj) < 16) {
        PyErr_SetString(PyExc_TypeError, "a 16-byte bytearray expected");
        return NULL;
    }
    double *times = (double *)PyByteArray_AS_STRING(times_obj);
    if (times[0] == 0.0) {
        double now = now_s();
        times[0] = now;
        if (times[1] == 0.0)
            times[1] = now;
    }
    Py_RETURN_NONE;
}

static void add(double *acc, int64_t *hist, int time_at, int hist_at, double seconds)
{
    acc[time_at] += seconds;
    if (seconds > acc[time_at + 1])
        acc[time_at + 1] = seconds;
    hist[hist_at + bucket(seconds)]++;
}

/* done(times, acc, hist, idle) -> now: ReadyForQuery ended the client's request (idle: and its
 * transaction). Nothing is counted when no client request was timed (a pooler query of its own).
 * Returns the monotonic time it read, the server's last_used, so the relay reads the clock once. */
static PyObject *done(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    double *times, *acc;
    int64_t *hist;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "done(times, acc, hist, idle)");
        return NULL;
    }
    if (buffers(args, &times, &acc, &hist) < 0)
        return NULL;
    double now = now_s();
    if (times[0] == 0.0)
        return PyFloat_FromDouble(now);
    add(acc, hist, Q_TIME, H_QUERY, now - times[0]);
    times[0] = 0.0;
    if (PyObject_IsTrue(args[3])) {
        add(acc, hist, X_TIME, H_XACT, now - times[1]);
        times[1] = 0.0;
    }
    return PyFloat_FromDouble(now);
}

/* waited(acc, hist, seconds): a client got a server after waiting this long (0: at once). */
static PyObject *waited(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyByteArray_CheckExact(args[0]) || !PyByteArray_CheckExact(args[1]) ||
        PyByteArray_GET_SIZE(args[0]) < ACC_N * 8 || PyByteArray_GET_SIZE(args[1]) < 3 * NB * 8) {
        PyErr_SetString(PyExc_TypeError, "waited(acc, hist, seconds)");
        return NULL;
    }
    double seconds = PyFloat_AsDouble(args[2]);
    if (seconds == -1.0 && PyErr_Occurred())
        return NULL;
    add((double *)PyByteArray_AS_STRING(args[0]), (int64_t *)PyByteArray_AS_STRING(args[1]), W_TIME,
        H_WAIT, seconds);
    Py_RETURN_NONE;
}

static PyObject *py_bucket(PyObject *self, PyObject *arg)
{
    double seconds = PyFloat_AsDouble(arg);
    if (seconds == -1.0 && PyErr_Occurred())
        return NULL;
    return PyLong_FromLong(bucket(seconds));
}

static PyMethodDef methods[] = {
    {"begin", (PyCFunction)begin, METH_O, "A client request begins: note the time."},
    {"done", (PyCFunction)(void (*)(void))done, METH_FASTCALL, "A client request (and transaction) ended."},
    {"waited", (PyCFunction)(void (*)(void))waited, METH_FASTCALL, "A client got a server after a wait."},
    {"bucket", (PyCFunction)py_bucket, METH_O, "The histogram bucket of a duration in seconds."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "pgdoorman.metrics._account",
                                    "Compiled per-transaction accounting (see account.py).", -1, methods};

PyMODINIT_FUNC PyInit__account(void)
{
    for (int i = 0; i < NB - 1; i++)
        bounds[i] = 1e-5 * pow(2.0, i / 4.0);
    return PyModule_Create(&module);
}
