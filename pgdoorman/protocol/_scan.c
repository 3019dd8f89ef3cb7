/* Compiled twin of pgdoorman/protocol/scan.py: the relay's frame scanners.
 *
 * Same functions, same results; see scan.py for what they mean. Only the plain, frequent cases
 * are handled here: anything needing the pooler's judgement is returned as SPECIAL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>
#include <strings.h>

enum { QUERY = 1, SYNC, PARSE, BIND, DESCRIBE, EXECUTE, CLOSE };
enum { DONE = 0, STREAM = 1, SPECIAL = 2, BAD_LENGTH = 3, SYNTH_DUE = 4 };
#define BIND_NAMED 12
#define HIDDEN_ROWS 17
#define SYNTH_FIRST 20
#define COPY_END 22
enum { NAMES_PLAIN = 0, NAMES_MAPPED = 1, NAMES_GUARDED = 2 };
enum { SAW_PARSE = 1, SAW_QUERY = 2 };

/* Whether text holds needle (needle_len >= 1) where it starts with one of the given first
 * bytes: memchr runs over the text at vector speed, and the rest is compared only there. Faster
 * than memmem for the short queries of the hot path. */
static inline int has_at(const unsigned char *text, size_t len, unsigned char first,
                         const char *rest, size_t rest_len)
{
    const unsigned char *p = text, *end = text + len;
    while (p < end && (p = memchr(p, first, (size_t)(end - p))) != NULL) {
        if ((size_t)(end - p) <= rest_len)
            return 0;
        if (!memcmp(p + 1, rest, rest_len))
            return 1;
        p++;
    }
    return 0;
}

/* p[0..n) equals lower (lowercase ASCII letters) in any case: b | 0x20 is a letter's lowercase,
 * and no other byte maps onto one. */
static inline int eq_nocase(const unsigned char *p, const char *lower, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if ((p[i] | 0x20) != (unsigned char)lower[i])
            return 0;
    return 1;
}

/* A query text that may change session state (see scan.py): it starts with SET, or mentions
 * "_config" (set_config), "_advisory" (advisory locks) or "temp" (temporary tables), or calls
 * nextval/setval, in any case. A false positive (pg_config, a column named temperature) costs one
 * read-back. memchr passes: every '_' for the first two marks, every 'm'/'M' for "temp" (rarer
 * than 't' in SQL), every 'v'/'V' for "nextval"/"setval". */
static inline int mentions_session_state(const unsigned char *text, size_t len)
{
    if (len >= 4 && eq_nocase(text, "set", 3) &&
        (text[3] == ' ' || text[3] == '\t' || text[3] == '\n' || text[3] == '\r'))
        return 1;
    const unsigned char *end = text + len, *p = text;
    while (p < end && (p = memchr(p, '_', (size_t)(end - p))) != NULL) {
        size_t left = (size_t)(end - p) - 1;
        if ((left >= 6 && eq_nocase(p + 1, "config", 6)) || (left >= 8 && eq_nocase(p + 1, "advisory", 8)))
            return 1;
        p++;
    }
    for (int upper = 0; upper < 2; upper++) {
        for (p = text + 2; p < end && (p = memchr(p, upper ? 'M' : 'm', (size_t)(end - p))) != NULL; p++)
            if (end - p >= 2 && eq_nocase(p - 2, "te", 2) && (p[1] | 0x20) == 'p')
                return 1;
    }
    for (int upper = 0; upper < 2; upper++) {
        for (p = text + 3; p < end && (p = memchr(p, upper ? 'V' : 'v', (size_t)(end - p))) != NULL; p++)
            if (end - p >= 3 && eq_nocase(p, "val", 3) &&
                (eq_nocase(p - 3, "set", 3) || (p - text >= 4 && eq_nocase(p - 4, "next", 4))))
                return 1;
    }
    return 0;
}

/* (a, b, c[, d]) as a tuple of ints, without Py_BuildValue's format parsing */
static PyObject *int_tuple(Py_ssize_t count, Py_ssize_t a, long b, long c, long d)
{
    PyObject *t = PyTuple_New(count);
    if (t == NULL)
        return NULL;
    PyObject *items[4] = {PyLong_FromSsize_t(a), PyLong_FromLong(b), PyLong_FromLong(c),
                          count > 3 ? PyLong_FromLong(d) : NULL};
    for (Py_ssize_t i = 0; i < count; i++) {
        if (items[i] == NULL) {
            for (Py_ssize_t j = 0; j < count; j++)
                Py_XDECREF(items[j]);
            Py_DECREF(t);
            return NULL;
        }
    }
    for (Py_ssize_t i = 0; i < count; i++)
        PyTuple_SET_ITEM(t, i, items[i]);
    return t;
}

static inline uint32_t be32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* Drop the first `count` kinds of the pending bytearray. */
static int consume(PyObject *pending, Py_ssize_t count)
{
    if (count == 0)
        return 0;
    Py_ssize_t len = PyByteArray_GET_SIZE(pending);
    char *buf = PyByteArray_AS_STRING(pending);
    memmove(buf, buf + count, (size_t)(len - count));
    return PyByteArray_Resize(pending, len - count);
}

static PyObject *popleft_name; /* "popleft", interned at import */

/* Backend messages that may arrive after login (scan.py _REPLY_KINDS); any other kind is the
 * pooler's to judge. */
static const unsigned char reply_kind[256] = {
    ['S'] = 1, ['Z'] = 1, ['C'] = 1, ['D'] = 1, ['E'] = 1, ['I'] = 1, ['N'] = 1, ['A'] = 1, ['T'] = 1,
    ['n'] = 1, ['t'] = 1, ['1'] = 1, ['2'] = 1, ['3'] = 1, ['s'] = 1, ['G'] = 1, ['H'] = 1, ['W'] = 1,
    ['d'] = 1, ['c'] = 1, ['V'] = 1,
};

static PyObject *scan_replies(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if ((nargs != 3 && nargs != 5) || !PyByteArray_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "scan_replies(data, pos, pending: bytearray[, refs, names])");
        return NULL;
    }
    PyObject *refs = nargs == 5 ? args[3] : NULL, *names = nargs == 5 ? args[4] : NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    if (pos < 0 && PyErr_Occurred()) {
        PyBuffer_Release(&view);
        return NULL;
    }
    PyObject *pending = args[2];
    const unsigned char *data = view.buf;
    Py_ssize_t n = view.len;
    const unsigned char *kinds = (const unsigned char *)PyByteArray_AS_STRING(pending);
    Py_ssize_t npending = PyByteArray_GET_SIZE(pending);
    Py_ssize_t head = 0; /* kinds[head] is the oldest request not yet answered */
    long last_z = -1, skip = 0;
    int result = DONE;

    while (pos + 5 <= n) {
        unsigned char kind = data[pos];
        Py_ssize_t length = (Py_ssize_t)be32(data + pos + 1);
        if (length < 4 || length > 0x7FFFFFFF) {
            result = BAD_LENGTH;
            break;
        }
        Py_ssize_t end = pos + 1 + length;
        /* the pooler reads the rows of its own HIDDEN_ROWS queries, whole */
        int rows_hidden = kind == 'D' && head < npending && kinds[head] == HIDDEN_ROWS;
        if (end > n) {
            if (head < npending && ((kind == 'D' && !rows_hidden) || kind == 'd' || kind == 'V')) {
                skip = (long)(end - n);
                pos = n;
                result = STREAM;
            }
            break;
        }
        if (kind == 'D') {
            if (rows_hidden || head >= npending) { /* rows nobody asked for: the pooler judges */
                result = SPECIAL;
                break;
            }
            pos = end;
            continue;
        }
        if (kind == '2' && refs != NULL && head < npending && kinds[head] == BIND_NAMED) {
            /* BindComplete of a rewritten client Bind: its statement and client name are done */
            PyObject *ref = PyObject_CallMethodNoArgs(refs, popleft_name);
            PyObject *name = ref ? PyObject_CallMethodNoArgs(names, popleft_name) : NULL;
            Py_XDECREF(ref);
            if (name == NULL) {
                PyBuffer_Release(&view);
                consume(pending, head); /* keep pending in step with what was popped */
                return NULL;
            }
            Py_DECREF(name);
            pos = end;
            head++;
            if (head < npending && kinds[head] >= SYNTH_FIRST) {
                result = SYNTH_DUE;
                break;
            }
            continue;
        }
        if (head >= npending || kind == 'S' || kind == 'E' || kind == 'G' || kinds[head] > CLOSE ||
            !reply_kind[kind] || (end == pos + 5 && (kind == 'Z' || kind == 'C'))) {
            result = SPECIAL;
            break;
        }
        unsigned char h = kinds[head];
        int popped = 0;
        if (kind == 'Z') {
            if (h != QUERY && h != SYNC) {
                result = SPECIAL; /* replies to skipped requests: the pooler settles */
                break;
            }
            popped = 1;
            last_z = data[pos + 5];
        } else if (kind == '1' || kind == '2' || kind == '3') {
            unsigned char want = kind == '1' ? PARSE : kind == '2' ? BIND : CLOSE;
            if (h != want) {
                result = SPECIAL;
                break;
            }
            popped = 1;
        } else if (kind == 'T' || kind == 'n') {
            popped = h == DESCRIBE;
        } else if (kind == 'C' || kind == 'I' || kind == 's') {
            const unsigned char *tag = data + pos + 5;
            size_t tag_len = (size_t)(end - pos - 5);
            /* DISCARD/DEALLOCATE ALL, or a statement that changed session state */
            if (kind == 'C' && (tag[0] == 'D' || (tag_len == 4 && !memcmp(tag, "SET", 4)) ||
                                (tag_len == 7 && !memcmp(tag, "LISTEN", 7)) ||
                                (tag_len == 5 && !memcmp(tag, "LOAD", 5)) ||
                                (tag_len == 6 && !memcmp(tag, "RESET", 6)) ||
                                (tag_len == 8 && !memcmp(tag, "PREPARE", 8)) ||
                                (tag[0] == 'I' && tag_len > 7 && !memcmp(tag, "INSERT ", 7)))) {
                result = SPECIAL;
                break;
            }
            popped = h == EXECUTE;
        }
        pos = end;
        if (popped) {
            head++;
            if (head < npending && kinds[head] >= SYNTH_FIRST) {
                result = SYNTH_DUE;
                break;
            }
        }
    }
    PyBuffer_Release(&view);
    if (consume(pending, head) < 0)
        return NULL;
    return int_tuple(4, pos, result, skip, last_z);
}

static PyObject *scan_requests(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if ((nargs != 5 && nargs != 6) || !PyByteArray_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError,
                        "scan_requests(data, pos, pending: bytearray, check_names, max_len[, whole_query])");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    long check_names = PyLong_AsLong(args[3]);
    Py_ssize_t max_len = PyLong_AsSsize_t(args[4]);
    Py_ssize_t whole_query = nargs == 6 ? PyLong_AsSsize_t(args[5]) : 0;
    if ((pos < 0 || max_len < 0 || check_names < 0 || whole_query < 0) && PyErr_Occurred()) {
        PyBuffer_Release(&view);
        return NULL;
    }
    PyObject *pending = args[2];
    const unsigned char *data = view.buf;
    Py_ssize_t n = view.len;
    unsigned char added[256];
    Py_ssize_t nadded = 0;
    long skip = 0;
    int result = DONE;
    long seen = 0; /* SAW_PARSE, SAW_QUERY: see scan.py */

    while (pos + 5 <= n) {
        if (nadded == (Py_ssize_t)sizeof(added)) {
            Py_ssize_t len = PyByteArray_GET_SIZE(pending);
            if (PyByteArray_Resize(pending, len + nadded) < 0) {
                PyBuffer_Release(&view);
                return NULL;
            }
            memcpy(PyByteArray_AS_STRING(pending) + len, added, (size_t)nadded);
            nadded = 0;
        }
        unsigned char kind = data[pos];
        Py_ssize_t length = (Py_ssize_t)be32(data + pos + 1);
        if (length < 4 || length > max_len) {
            result = BAD_LENGTH;
            break;
        }
        Py_ssize_t end = pos + 1 + length;
        if (end > n) {
            if (kind == 'B') { /* streamed once both names are here (large parameters) */
                const unsigned char *nul = memchr(data + pos + 5, 0, (size_t)(n - pos - 5));
                if (!nul)
                    break;
                Py_ssize_t name_at = (nul - data) + 1;
                if (name_at >= n || !memchr(data + name_at, 0, (size_t)(n - name_at)))
                    break;
                if (check_names && (data[name_at] != 0 || check_names == NAMES_GUARDED)) {
                    result = SPECIAL;
                    break;
                }
                added[nadded++] = BIND;
                skip = (long)(end - n);
                pos = n;
                result = STREAM;
                break;
            }
            if (kind == 'Q' && check_names) { /* a Query the pooler may have to read */
                Py_ssize_t avail = n - pos - 5, want = length - 4 < 10 ? length - 4 : 10;
                if (length <= whole_query || avail < want)
                    break; /* read whole (its session-state marks), or at least its start */
                if (strchr("DdPp", data[pos + 5]) &&
                    ((avail >= 10 && !strncasecmp((const char *)data + pos + 5, "deallocate", 10)) ||
                     (avail >= 7 && !strncasecmp((const char *)data + pos + 5, "prepare", 7))))
                    break;
            }
            if (!strchr("PBDCX", kind) || kind == 0) {
                unsigned char owed = 0;
                switch (kind) {
                case 'Q':
                case 'F':
                    owed = QUERY;
                    break;
                case 'E':
                    owed = EXECUTE;
                    break;
                case 'S':
                    owed = SYNC;
                    break;
                case 'c':
                case 'f':
                    owed = COPY_END;
                    break;
                case 'd':
                case 'H':
                    break;
                default:
                    result = SPECIAL; /* not a frontend message */
                }
                if (result == SPECIAL)
                    break;
                if (owed) /* owed a reply from its first byte */
                    added[nadded++] = owed;
                if (owed == QUERY)
                    seen |= SAW_QUERY;
                skip = (long)(end - n);
                pos = n;
                result = STREAM;
            }
            break;
        }
        unsigned char add = 0;
        switch (kind) {
        case 'Q':
            /* SQL DEALLOCATE / PREPARE: the pooler looks at them (see scan.py) */
            if (check_names && length >= 11 &&
                ((data[pos + 5] && strchr("DdPp", data[pos + 5]) &&
                  ((length >= 14 && !strncasecmp((const char *)data + pos + 5, "deallocate", 10)) ||
                   !strncasecmp((const char *)data + pos + 5, "prepare", 7))) ||
                 has_at(data + pos + 5, (size_t)(length - 4), '"', "PGDOORMAN_", 10) ||
                 mentions_session_state(data + pos + 5, (size_t)(length - 4))))
                result = SPECIAL;
            add = QUERY;
            break;
        case 'F':
            add = QUERY;
            break;
        case 'E':
            add = EXECUTE;
            break;
        case 'S':
            add = SYNC;
            break;
        case 'P':
            if (check_names && (length < 6 || data[pos + 5] != 0 ||
                                mentions_session_state(data + pos + 6, (size_t)(length - 5))))
                result = SPECIAL;
            else if (check_names == NAMES_GUARDED)
                check_names = NAMES_MAPPED; /* the unnamed statement is this client's from here on */
            add = PARSE;
            break;
        case 'B': {
            const unsigned char *nul = memchr(data + pos + 5, 0, (size_t)(end - pos - 5));
            Py_ssize_t name_at = nul ? (nul - data) + 1 : end;
            if (name_at >= end ||
                (check_names && (data[name_at] != 0 || check_names == NAMES_GUARDED)))
                result = SPECIAL;
            add = BIND;
            break;
        }
        case 'D':
        case 'C':
            if (check_names && length > 5 && data[pos + 5] == 'S' &&
                (data[pos + 6] != 0 || (kind == 'D' && check_names == NAMES_GUARDED)))
                result = SPECIAL;
            add = kind == 'D' ? DESCRIBE : CLOSE;
            break;
        case 'c':
        case 'f':
            add = COPY_END;
            break;
        case 'H':
        case 'd':
            break;
        default:
            result = SPECIAL; /* Terminate, or not a frontend message */
        }
        if (result == SPECIAL)
            break;
        if (add) {
            added[nadded++] = add;
            if (add == PARSE)
                seen = SAW_PARSE;
            else if (add == QUERY)
                seen |= SAW_QUERY;
        }
        pos = end;
    }
    PyBuffer_Release(&view);
    if (nadded) {
        Py_ssize_t len = PyByteArray_GET_SIZE(pending);
        if (PyByteArray_Resize(pending, len + nadded) < 0)
            return NULL;
        memcpy(PyByteArray_AS_STRING(pending) + len, added, (size_t)nadded);
    }
    return int_tuple(4, pos, result, skip, check_names ? seen : 0);
}

static PyMethodDef methods[] = {
    {"scan_replies", (PyCFunction)(void (*)(void))scan_replies, METH_FASTCALL,
     "Walk server messages, consuming pending (and refs, names): (pos, result, skip, last_z)."},
    {"scan_requests", (PyCFunction)(void (*)(void))scan_requests, METH_FASTCALL,
     "Walk client messages, appending to pending: (pos, result, skip, seen)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "pgdoorman.protocol._scan",
                                    "Compiled frame scanners (see scan.py).", -1, methods};

PyMODINIT_FUNC PyInit__scan(void)
{
    popleft_name = PyUnicode_InternFromString("popleft");
    if (popleft_name == NULL)
        return NULL;
    return PyModule_Create(&module);
}
