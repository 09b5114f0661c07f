/* The numpy path's last step in one pass over memory: out = round(widen(stored) + delta), and whether
 * every sum is finite. numpy needs seven passes for it (widen, add, a sum for the check, four for the
 * rounding). Optional: lorafuse builds and runs without it (compute/rows.py falls back to numpy), and the
 * tests compare the two bit for bit.
 *
 * Types: BF16 and F32, in and out (F16 stays on the numpy path: its rounding and overflow check are
 * numpy's own). Rounding: to nearest, ties to even, as torch and formats/arrays.narrow round.
 * `stored` and `out` may be the same memory (the result overwrites the rows it was made from): each
 * chunk of values is copied to the stack before its results are written, and an output value is never
 * wider than its input, so no write reaches a value not yet read.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define CHUNK 512

/* Made for AVX2 as well where the compiler can choose between versions when the module loads (GCC on
 * x86-64 Linux): twice as fast as the SSE2 every x86-64 has, and a build runs on any of them. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define VECTOR_CLONES
#endif

static int is_finite_bits(uint32_t u) { return (u & 0x7F800000u) != 0x7F800000u; }

static uint16_t round_bf16(uint32_t u) { return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16); }

/* One chunk: n values from `in` (bf16 when in_bf16, else f32) plus delta into `out`; returns 0 on a
 * NaN or an infinity. */
VECTOR_CLONES static int chunk(const char *in, int in_bf16, const float *delta, char *out, int out_bf16, Py_ssize_t n) {
    float sums[CHUNK];
    uint32_t bad = 0;
    if (in_bf16) {
        uint16_t src[CHUNK];
        memcpy(src, in, (size_t)n * 2);
        for (Py_ssize_t i = 0; i < n; i++) {
            uint32_t bits = (uint32_t)src[i] << 16;
            float value;
            memcpy(&value, &bits, 4);
            sums[i] = value + delta[i];
        }
    } else {
        float src[CHUNK];
        memcpy(src, in, (size_t)n * 4);
        for (Py_ssize_t i = 0; i < n; i++)
            sums[i] = src[i] + delta[i];
    }
    if (out_bf16) {
        uint16_t result[CHUNK];
        for (Py_ssize_t i = 0; i < n; i++) {
            uint32_t bits;
            memcpy(&bits, &sums[i], 4);
            bad |= !is_finite_bits(bits);
            result[i] = round_bf16(bits);
        }
        memcpy(out, result, (size_t)n * 2);
    } else {
        for (Py_ssize_t i = 0; i < n; i++) {
            uint32_t bits;
            memcpy(&bits, &sums[i], 4);
            bad |= !is_finite_bits(bits);
        }
        memcpy(out, sums, (size_t)n * 4);
    }
    return !bad;
}

static PyObject *add_round(PyObject *self, PyObject *args) {
    Py_buffer stored, delta, out;
    int in_bf16, out_bf16;
    if (!PyArg_ParseTuple(args, "y*py*w*p", &stored, &in_bf16, &delta, &out, &out_bf16))
        return NULL;
    Py_ssize_t n = delta.len / 4;
    PyObject *result = NULL;
    if (delta.len % 4 || stored.len != n * (in_bf16 ? 2 : 4) || out.len != n * (out_bf16 ? 2 : 4)) {
        PyErr_SetString(PyExc_ValueError, "add_round: the buffers' sizes do not match");
    } else {
        int finite = 1;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t start = 0; start < n; start += CHUNK) {
            Py_ssize_t count = n - start < CHUNK ? n - start : CHUNK;
            finite &= chunk((const char *)stored.buf + start * (in_bf16 ? 2 : 4), in_bf16,
                            (const float *)delta.buf + start, (char *)out.buf + start * (out_bf16 ? 2 : 4),
                            out_bf16, count);
        }
        Py_END_ALLOW_THREADS
        result = PyBool_FromLong(finite);
    }
    PyBuffer_Release(&stored);
    PyBuffer_Release(&delta);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"add_round", add_round, METH_VARARGS,
     "add_round(stored, in_bf16, delta, out, out_bf16) -> bool: out = round(widen(stored) + delta) for "
     "BF16 (flag true) or F32 values; whether every sum was finite (out is then unusable if not)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
