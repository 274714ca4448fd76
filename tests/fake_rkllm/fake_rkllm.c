/*
 * A stand-in for Rockchip's librkllmrt.so, for tests on machines without an NPU.
 *
 * It exports the symbols of rkllm.h with the struct layouts of one runtime
 * release, chosen at build time:
 *   cc -shared -fPIC -DFAKE_RKLLM_LAYOUT=121 -DFAKE_RKLLM_VERSION='"1.2.3"' fake_rkllm.c -o librkllmrt.so -lpthread
 * FAKE_RKLLM_LAYOUT is 114 (releases 1.1.0-1.1.4), 120 (1.2.0), 121 (1.2.1-1.2.3) or 130 (1.3.0).
 *
 * It behaves like the runtime where a binding can get things wrong: it checks
 * every parameter it is given (a binding with a wrong layout fails loudly
 * here instead of silently), validates the model file, paces prefill and
 * decode, keeps a KV cache (keep_history, rkllm_clear_kv_cache,
 * rkllm_get_kv_cache_size), stops on rkllm_abort, holds back split UTF-8
 * characters (WAITING), and can report ERROR or crash on the Nth token. It
 * answers RKLLM_INFER_GET_LAST_HIDDEN_LAYER (embeddings: a function of the
 * context) but computes no logits.
 * The text pointer handed to the callback is only valid during the callback:
 * the buffer is scribbled over right after, as a real runtime may reuse it.
 *
 * It is no stricter than the real runtime with what real clients send (rkllama of
 * both eras, Rockchip's rkllm_server_demo/flask_server.py): empty strings in
 * img_start/img_end/img_content are accepted (the demos of 1.1.4-1.2.x set them);
 * a top_k that is not a sane count (rkllama since 2026 declares it as a float, so
 * 7.0 arrives as 1088421888) is treated as "the whole vocabulary" with a warning on
 * stderr, as a sampler clamping k to the vocabulary size would; CPU settings naming
 * CPUs the board lacks (rkllama of 2025: enabled_cpus_num = cpu_count(), mask
 * (1 << (n + 1)) - 1) are narrowed to the 8 cores, with a warning; any
 * RKLLMInferParam.max_new_tokens <= 0 means the init value; prompt input (text)
 * is accepted too: the fake has no tokenizer, so it counts one token per 4 bytes of
 * system prompt + prefix + text + postfix (set by rkllm_set_chat_template), which is
 * enough to pick an answer, pace the prefill and cache prefixes.
 *
 * Prompt caches (every release: RKLLMPromptCacheParam, rkllm_load_prompt_cache,
 * rkllm_release_prompt_cache). rkllm.h documents only "save the prompt cache" to a
 * path and "load a prompt cache from a file", so the fake follows the narrowest
 * reading:
 *   - save_prompt_cache=1 writes, once the run ends, the KV state after the input's
 *     prefill: the history kept before the run (keep_history=1) plus the input, never
 *     the generated answer (no release documents that the answer is kept). A run that
 *     fails before its prefill completes writes nothing. A path that cannot be written
 *     costs a stderr line, not the run.
 *   - the file holds the token ids, their count, an FNV-1a checksum, the runtime's
 *     release line and the identity of the model file (a hash of its bytes).
 *   - rkllm_load_prompt_cache restores that KV state (rkllm_get_kv_cache_size then
 *     reports it) and keeps the ids in memory as a reusable prefix until
 *     rkllm_release_prompt_cache; it returns 0, or -1 with a stderr line for a
 *     missing, corrupt or foreign file (another model, another release line, longer
 *     than max_context_len) or while a run is in progress. Loading takes time
 *     proportional to the size, 1/20 of what prefilling it takes (prefill_ms/20 per
 *     token, or cache_load_ms= per token from the model file).
 *   - a run with keep_history=1 continues from the restored state, so only its input
 *     (the new suffix) is prefilled; a run that starts from an empty history
 *     (keep_history=0, as rkllama and the demos send) whose input begins with the
 *     loaded prefix prefills only the rest ("automatic prompt cache reuse", 1.2.0
 *     CHANGELOG; the fake does it on every release). Anything else is prefilled in
 *     full: the fake only reuses what it knows exactly. (rkllama names its per-session
 *     files as if they held the answer too, but sends the whole conversation again,
 *     so it works under this reading and under a wider one.)
 *   Trace lines: "prompt_cache load n=N", "prompt_cache reuse n=N", "prompt_cache save n=N".
 *
 * The "model" is a small text file (written by tests/fake_rkllm/__init__.py):
 *   RKLLM-FAKE-MODEL 1
 *   toolkit_version=1.2.3        must match this runtime's major.minor, else "invalid model magic"
 *   max_context_limit=4096
 *   stop=151645,151643           ids that end an answer (never fed back)
 *   special=151643,151644,151645 ids whose text skip_special_token hides
 *   piece=<id>:<hex bytes>       the bytes of each token an answer uses
 *   answer=<id>,<id>,...         one or more; the context picks one (FNV hash)
 *   load_ms= prefill_base_ms= prefill_ms= decode_ms=   pacing (floats)
 *   error_at=N [error_if_input_has=<id>]   report ERROR at the Nth generated token
 *   crash_at=N [crash_if_input_has=<id>] crash_mode=segv|abort|kill|exit
 *   waiting_style=empty|partial|restate    what text a WAITING callback carries
 *   finish_after_abort=0|1  emit_eos=0|1  crash_on_load=0|1  ignore_abort=0|1 (a hung runtime)
 *   cache_load_ms=  milliseconds per token to load a prompt cache (default prefill_ms/20)
 *   crash_in_save=1  a run that saves a prompt cache dies while writing it: about half of the file goes to
 *                    the temporary name, the same truncated bytes to the given path itself (as a runtime
 *                    writing in place would leave them), then the process is killed (SIGKILL, as
 *                    crash_mode=kill); traced "prompt_cache save crash n=N bytes=B of T"
 *   embd_size=N  hidden size for RKLLM_INFER_GET_LAST_HIDDEN_LAYER (default 1536; rkllama's embeddings)
 *   hidden_layer=0  the model gives no last hidden layer (that mode then ends with FINISH alone)
 *   trace=<file> (one line per API call)
 *
 * Sampling. Every generating run traces the sampling it applies, as
 *   "sampling from=run|init top_k=K top_p=P temp=T repeat=R freq=F presence=Q mirostat=M max_new=N"
 * before its "run" line: on 1.3.0 a run with RKLLMInferParam.sampling_params uses those (from=run; they
 * replace every init value, mirostat included), any other run the RKLLMParam values of rkllm_init
 * (from=init). max_new is the limit the run applies: 1.3.0's per-run max_new_tokens when > 0, else the
 * init value (-1: none). No release has a seed, so none is traced. The fake does not sample (the
 * answer is a function of the context), but what reached the runtime is on record.
 *
 * The last hidden layer (RKLLM_INFER_GET_LAST_HIDDEN_LAYER): one callback after the prefill with
 * num_tokens = the tokens prefilled and embd_size floats per token, row t a function of the context up
 * to token t (the same tokens give the same rows, different ones different rows); 1.1.x reports it in
 * its state RKLLM_RUN_GET_LAST_HIDDEN_LAYER = 4 (its llm_demo.cpp reads it there), later releases in
 * NORMAL (their demos read it there); then FINISH, and no token is generated. Traced "hidden n=N embd=E".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#ifndef FAKE_RKLLM_LAYOUT
#error "define FAKE_RKLLM_LAYOUT (114, 120, 121 or 130)"
#endif
#ifndef FAKE_RKLLM_VERSION
#error "define FAKE_RKLLM_VERSION, e.g. -DFAKE_RKLLM_VERSION='\"1.2.3\"'"
#endif

#define EXPORT __attribute__((visibility("default")))

/* The banner the runtime prints at rkllm_init; it also carries the version in the file's bytes. */
static const char BANNER[] =
    "I rkllm: rkllm-runtime version: " FAKE_RKLLM_VERSION ", rknpu driver version: %s, platform: %s\n";

/* ---------------------------------------------------------------------------------------------
 * rkllm.h, per layout
 * ------------------------------------------------------------------------------------------- */
typedef void *LLMHandle;

typedef enum {
    RKLLM_RUN_NORMAL = 0,
    RKLLM_RUN_WAITING = 1,
    RKLLM_RUN_FINISH = 2,
    RKLLM_RUN_ERROR = 3,
} LLMCallState;

typedef enum {
    RKLLM_INPUT_PROMPT = 0,
    RKLLM_INPUT_TOKEN = 1,
    RKLLM_INPUT_EMBED = 2,
    RKLLM_INPUT_MULTIMODAL = 3,
} RKLLMInputType;

typedef enum {
    RKLLM_INFER_GENERATE = 0,
    RKLLM_INFER_GET_LAST_HIDDEN_LAYER = 1,
    RKLLM_INFER_GET_LOGITS = 2,
} RKLLMInferMode;

#if FAKE_RKLLM_LAYOUT == 114
typedef struct {
    int32_t base_domain_id;
    uint8_t reserved[112];
} RKLLMExtendParam;
#elif FAKE_RKLLM_LAYOUT == 120
typedef struct {
    int32_t base_domain_id;
    int8_t embed_flash;
    int8_t enabled_cpus_num;
    uint32_t enabled_cpus_mask;
    uint8_t reserved[106];
} RKLLMExtendParam;
#else
typedef struct {
    int32_t base_domain_id;
    int8_t embed_flash;
    int8_t enabled_cpus_num;
    uint32_t enabled_cpus_mask;
    uint8_t n_batch;
    int8_t use_cross_attn;
    uint8_t reserved[104];
} RKLLMExtendParam;
#endif

typedef struct {
    const char *model_path;
    int32_t max_context_len;
    int32_t max_new_tokens;
    int32_t top_k;
#if FAKE_RKLLM_LAYOUT >= 120
    int32_t n_keep;
#endif
    float top_p;
    float temperature;
    float repeat_penalty;
    float frequency_penalty;
    float presence_penalty;
    int32_t mirostat;
    float mirostat_tau;
    float mirostat_eta;
    bool skip_special_token;
#if FAKE_RKLLM_LAYOUT >= 130
    bool ignore_eos_token;
#endif
    bool is_async;
#if FAKE_RKLLM_LAYOUT < 130
    const char *img_start;
    const char *img_end;
    const char *img_content;
#endif
    RKLLMExtendParam extend_param;
} RKLLMParam;

typedef struct {
    const char *lora_adapter_path;
    const char *lora_adapter_name;
    float scale;
} RKLLMLoraAdapter;

typedef struct {
    float *embed;
    size_t n_tokens;
} RKLLMEmbedInput;

typedef struct {
    int32_t *input_ids;
    size_t n_tokens;
} RKLLMTokenInput;

#if FAKE_RKLLM_LAYOUT <= 120
typedef struct {
    char *prompt;
    float *image_embed;
    size_t n_image_tokens;
} RKLLMMultiModalInput;
#elif FAKE_RKLLM_LAYOUT == 121
typedef struct {
    char *prompt;
    float *image_embed;
    size_t n_image_tokens;
    size_t n_image;
    size_t image_width;
    size_t image_height;
} RKLLMMultiModalInput;
#else
typedef struct {
    char *prompt;
    struct {
        float *image_embed;
        size_t n_image_tokens;
        size_t n_image;
        const char *image_start;
        const char *image_end;
        const char *image_content;
        size_t image_width;
        size_t image_height;
    } image;
    struct {
        float *video_embed;
        size_t n_frame_tokens;
        size_t n_frame_per_video;
        size_t n_video;
        const char *video_start;
        const char *video_end;
        const char *video_content;
        size_t frame_width;
        size_t frame_height;
    } video;
} RKLLMMultiModalInput;
#endif

typedef struct {
#if FAKE_RKLLM_LAYOUT >= 121
    const char *role;
    bool enable_thinking;
#endif
    RKLLMInputType input_type;
    union {
        const char *prompt_input;
        RKLLMEmbedInput embed_input;
        RKLLMTokenInput token_input;
        RKLLMMultiModalInput multimodal_input;
    };
} RKLLMInput;

typedef struct {
    const char *lora_adapter_name;
} RKLLMLoraParam;

typedef struct {
    int save_prompt_cache;
    const char *prompt_cache_path;
} RKLLMPromptCacheParam;

typedef struct {
    float *encoder_k_cache;
    float *encoder_v_cache;
    float *encoder_mask;
    int32_t *encoder_pos;
    int num_tokens;
} RKLLMCrossAttnParam;

#if FAKE_RKLLM_LAYOUT >= 130
typedef struct {
    int32_t top_k;
    float top_p;
    float temperature;
    float repeat_penalty;
    float frequency_penalty;
    float presence_penalty;
    int32_t mirostat;
    float mirostat_tau;
    float mirostat_eta;
} RKLLMSamplingParam;
#endif

typedef struct {
    RKLLMInferMode mode;
    RKLLMLoraParam *lora_params;
    RKLLMPromptCacheParam *prompt_cache_params;
#if FAKE_RKLLM_LAYOUT >= 130
    RKLLMSamplingParam *sampling_params;
#endif
#if FAKE_RKLLM_LAYOUT >= 120
    int keep_history;
#endif
#if FAKE_RKLLM_LAYOUT >= 130
    int32_t max_new_tokens;
#endif
} RKLLMInferParam;

typedef struct {
    const float *hidden_states;
    int embd_size;
    int num_tokens;
} RKLLMResultLastHiddenLayer;

typedef struct {
    const float *logits;
    int vocab_size;
    int num_tokens;
} RKLLMResultLogits;

typedef struct {
    float prefill_time_ms;
    int prefill_tokens;
    float generate_time_ms;
    int generate_tokens;
    float memory_usage_mb;
} RKLLMPerfStat;

typedef struct {
    const char *text;
    int32_t token_id;
    RKLLMResultLastHiddenLayer last_hidden_layer;
#if FAKE_RKLLM_LAYOUT >= 120
    RKLLMResultLogits logits;
#endif
#if FAKE_RKLLM_LAYOUT >= 121
    RKLLMPerfStat perf;
#endif
} RKLLMResult;

#if FAKE_RKLLM_LAYOUT >= 121
typedef int (*LLMResultCallback)(RKLLMResult *result, void *userdata, LLMCallState state);
#else
typedef void (*LLMResultCallback)(RKLLMResult *result, void *userdata, LLMCallState state);
#endif

#if FAKE_RKLLM_LAYOUT >= 130
typedef int (*LLMGetEmbedCallback)(void *userdata, int32_t *tokens, uint64_t num_tokens, void *embed, uint64_t len);
typedef int (*LLMTokenizerCallback)(void *userdata, const char *text, int32_t text_len, int32_t *tokens,
                                    int32_t n_tokens_max);
typedef struct {
    LLMResultCallback result_callback;
    void *result_userdata;
    LLMTokenizerCallback tokenizer_callback;
    void *tokenizer_userdata;
    LLMGetEmbedCallback embed_callback;
    void *embed_userdata;
} RKLLMCallback;
#endif

/* ---------------------------------------------------------------------------------------------
 * The fake model and the context behind a handle
 * ------------------------------------------------------------------------------------------- */
enum { WAIT_EMPTY = 0, WAIT_PARTIAL = 1, WAIT_RESTATE = 2 };
enum { CRASH_SEGV = 0, CRASH_ABORT = 1, CRASH_KILL = 2, CRASH_EXIT = 3 };

typedef struct {
    int32_t *ids;
    int n;
} IdList;

typedef struct {
    /* model file */
    char toolkit_version[32];
    char platform[32];
    int max_context_limit;
    IdList stop, special;
    IdList *answers;
    int n_answers;
    unsigned char **piece;
    int *piece_len;
    int piece_cap;
    double load_ms, prefill_base_ms, prefill_ms, decode_ms, cache_load_ms;
    int embd_size;     /* hidden size reported by RKLLM_INFER_GET_LAST_HIDDEN_LAYER */
    int hidden_layer;  /* 0: the model gives no last hidden layer */
    uint32_t model_id; /* FNV-1a of the model file's bytes: a prompt cache belongs to one model */
    int error_at, error_if_input_has, crash_at, crash_if_input_has, crash_mode;
    int waiting_style, finish_after_abort, emit_eos, ignore_abort, crash_in_save;
    char trace[1024];

    /* init parameters */
    int max_context_len, max_new_tokens;
    int32_t init_top_k, init_mirostat; /* the sampling of rkllm_init: runs without their own use it */
    float init_top_p, init_temperature, init_repeat_penalty, init_frequency_penalty, init_presence_penalty;
    bool skip_special_token;
    LLMResultCallback callback;
    void *callback_userdata;

    /* state */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int running, abort_flag, destroyed;
    int32_t *kv;
    int kv_len;
    int32_t *cache; /* the loaded prompt cache: a prefix runs from an empty history may reuse */
    int cache_len;
    char *chat_system, *chat_prefix, *chat_postfix; /* rkllm_set_chat_template, for prompt input */
} FakeContext;

static void trace(FakeContext *ctx, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#include <stdarg.h>
static void trace(FakeContext *ctx, const char *fmt, ...) {
    if (!ctx || !ctx->trace[0]) return;
    FILE *f = fopen(ctx->trace, "a");
    if (!f) return;
    va_list ap;
    va_start(ap, fmt);
    fprintf(f, "%d ", (int)getpid());
    vfprintf(f, fmt, ap);
    fputc('\n', f);
    va_end(ap);
    fclose(f);
}

static int id_in(const IdList *list, int32_t id) {
    for (int i = 0; i < list->n; i++)
        if (list->ids[i] == id) return 1;
    return 0;
}

static int parse_ids(const char *text, IdList *out) {
    int cap = 16, n = 0;
    int32_t *ids = malloc(sizeof(int32_t) * cap);
    const char *p = text;
    while (*p) {
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p) break;
        if (n == cap) {
            cap *= 2;
            ids = realloc(ids, sizeof(int32_t) * cap);
        }
        ids[n++] = (int32_t)v;
        p = end;
        while (*p == ',' || *p == ' ') p++;
    }
    out->ids = ids;
    out->n = n;
    return n;
}

static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static int add_piece(FakeContext *ctx, const char *spec) {
    char *end;
    long id = strtol(spec, &end, 10);
    if (end == spec || *end != ':' || id < 0 || id > (1 << 22)) return -1;
    const char *hex = end + 1;
    size_t hl = strlen(hex);
    while (hl && (hex[hl - 1] == '\n' || hex[hl - 1] == '\r')) hl--;
    if (hl % 2) return -1;
    if (id >= ctx->piece_cap) {
        int cap = ctx->piece_cap ? ctx->piece_cap : 1024;
        while (cap <= id) cap *= 2;
        ctx->piece = realloc(ctx->piece, sizeof(unsigned char *) * cap);
        ctx->piece_len = realloc(ctx->piece_len, sizeof(int) * cap);
        for (int i = ctx->piece_cap; i < cap; i++) {
            ctx->piece[i] = NULL;
            ctx->piece_len[i] = -1;
        }
        ctx->piece_cap = cap;
    }
    unsigned char *bytes = malloc(hl / 2 + 1);
    for (size_t i = 0; i < hl / 2; i++) {
        int hi = hexval(hex[2 * i]), lo = hexval(hex[2 * i + 1]);
        if (hi < 0 || lo < 0) {
            free(bytes);
            return -1;
        }
        bytes[i] = (unsigned char)(hi * 16 + lo);
    }
    free(ctx->piece[id]);
    ctx->piece[id] = bytes;
    ctx->piece_len[id] = (int)(hl / 2);
    return 0;
}

/* "1.2.3" and "1.2.0" share a release line; "1.1.4" and "1.2.3" do not. */
static int same_line(const char *a, const char *b) {
    int am = -1, an = -1, bm = -1, bn = -1;
    sscanf(a, "%d.%d", &am, &an);
    sscanf(b, "%d.%d", &bm, &bn);
    return am >= 0 && am == bm && an == bn;
}

static void crash(FakeContext *ctx, int at);

static int load_model(FakeContext *ctx, const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "E rkllm: failed to open model file %s: %s\n", path, strerror(errno));
        return -1;
    }
    char *line = NULL;
    size_t cap = 0;
    ssize_t len = getline(&line, &cap, f);
    if (len <= 0 || strncmp(line, "RKLLM-FAKE-MODEL 1", 18) != 0) {
        fprintf(stderr, "E rkllm: invalid model magic, %s is not an rkllm model for this runtime\n", path);
        fprintf(stderr, "E rkllm: load model file error!\n");
        free(line);
        fclose(f);
        return -1;
    }
    int crash_on_load = 0;
    ctx->max_context_limit = 4096;
    ctx->cache_load_ms = -1;
    ctx->model_id = 2166136261u;
    for (ssize_t i = 0; i < len; i++) ctx->model_id = (ctx->model_id ^ (unsigned char)line[i]) * 16777619u;
    strcpy(ctx->platform, "RK3588");
    strcpy(ctx->toolkit_version, FAKE_RKLLM_VERSION);
    while ((len = getline(&line, &cap, f)) > 0) {
        for (ssize_t i = 0; i < len; i++) ctx->model_id = (ctx->model_id ^ (unsigned char)line[i]) * 16777619u;
        while (len && (line[len - 1] == '\n' || line[len - 1] == '\r')) line[--len] = 0;
        char *eq = strchr(line, '=');
        if (!eq || line[0] == '#') continue;
        *eq = 0;
        const char *key = line, *val = eq + 1;
        if (!strcmp(key, "toolkit_version")) snprintf(ctx->toolkit_version, sizeof ctx->toolkit_version, "%s", val);
        else if (!strcmp(key, "platform")) snprintf(ctx->platform, sizeof ctx->platform, "%s", val);
        else if (!strcmp(key, "max_context_limit")) ctx->max_context_limit = atoi(val);
        else if (!strcmp(key, "stop")) parse_ids(val, &ctx->stop);
        else if (!strcmp(key, "special")) parse_ids(val, &ctx->special);
        else if (!strcmp(key, "piece")) {
            if (add_piece(ctx, val) != 0) {
                fprintf(stderr, "E rkllm: corrupt model file %s (piece %s)\n", path, val);
                free(line);
                fclose(f);
                return -1;
            }
        } else if (!strcmp(key, "answer")) {
            ctx->answers = realloc(ctx->answers, sizeof(IdList) * (ctx->n_answers + 1));
            parse_ids(val, &ctx->answers[ctx->n_answers++]);
        } else if (!strcmp(key, "load_ms")) ctx->load_ms = atof(val);
        else if (!strcmp(key, "prefill_base_ms")) ctx->prefill_base_ms = atof(val);
        else if (!strcmp(key, "prefill_ms")) ctx->prefill_ms = atof(val);
        else if (!strcmp(key, "decode_ms")) ctx->decode_ms = atof(val);
        else if (!strcmp(key, "cache_load_ms")) ctx->cache_load_ms = atof(val);
        else if (!strcmp(key, "embd_size")) ctx->embd_size = atoi(val);
        else if (!strcmp(key, "hidden_layer")) ctx->hidden_layer = atoi(val);
        else if (!strcmp(key, "error_at")) ctx->error_at = atoi(val);
        else if (!strcmp(key, "error_if_input_has")) ctx->error_if_input_has = atoi(val);
        else if (!strcmp(key, "crash_at")) ctx->crash_at = atoi(val);
        else if (!strcmp(key, "crash_if_input_has")) ctx->crash_if_input_has = atoi(val);
        else if (!strcmp(key, "crash_mode")) {
            ctx->crash_mode = !strcmp(val, "abort") ? CRASH_ABORT
                              : !strcmp(val, "kill") ? CRASH_KILL
                              : !strcmp(val, "exit") ? CRASH_EXIT
                                                     : CRASH_SEGV;
        } else if (!strcmp(key, "waiting_style")) {
            ctx->waiting_style = !strcmp(val, "partial") ? WAIT_PARTIAL : !strcmp(val, "restate") ? WAIT_RESTATE
                                                                                                   : WAIT_EMPTY;
        } else if (!strcmp(key, "finish_after_abort")) ctx->finish_after_abort = atoi(val);
        else if (!strcmp(key, "emit_eos")) ctx->emit_eos = atoi(val);
        else if (!strcmp(key, "ignore_abort")) ctx->ignore_abort = atoi(val);
        else if (!strcmp(key, "crash_in_save")) ctx->crash_in_save = atoi(val);
        else if (!strcmp(key, "trace")) snprintf(ctx->trace, sizeof ctx->trace, "%s", val);
        else if (!strcmp(key, "crash_on_load")) crash_on_load = atoi(val);
    }
    free(line);
    fclose(f);
    if (crash_on_load) crash(ctx, 0);
    if (ctx->cache_load_ms < 0) ctx->cache_load_ms = ctx->prefill_ms / 20.0;
    if (ctx->embd_size <= 0 || ctx->embd_size > 16384) ctx->embd_size = 1536;
    fprintf(stderr, "I rkllm: rkllm-toolkit version: %s, max_context_limit: %d, npu_core_num: 3, "
                    "target_platform: %s, model_dtype: W8A8\n",
            ctx->toolkit_version, ctx->max_context_limit, ctx->platform);
    if (!same_line(ctx->toolkit_version, FAKE_RKLLM_VERSION)) {
        fprintf(stderr, "E rkllm: invalid model magic: the model was converted by rkllm-toolkit %s, "
                        "this is rkllm-runtime %s\n",
                ctx->toolkit_version, FAKE_RKLLM_VERSION);
        return -1;
    }
    if (ctx->n_answers == 0) {
        fprintf(stderr, "E rkllm: corrupt model file %s (no answer)\n", path);
        return -1;
    }
    return 0;
}

static void free_context(FakeContext *ctx) {
    for (int i = 0; i < ctx->piece_cap; i++) free(ctx->piece[i]);
    free(ctx->piece);
    free(ctx->piece_len);
    for (int i = 0; i < ctx->n_answers; i++) free(ctx->answers[i].ids);
    free(ctx->answers);
    free(ctx->stop.ids);
    free(ctx->special.ids);
    free(ctx->kv);
    free(ctx->cache);
    free(ctx->chat_system);
    free(ctx->chat_prefix);
    free(ctx->chat_postfix);
    pthread_mutex_destroy(&ctx->mu);
    pthread_cond_destroy(&ctx->cv);
    free(ctx);
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000.0 + ts.tv_nsec / 1e6;
}

/* Sleep like the NPU works; returns 0 if rkllm_abort came meanwhile. */
static int pace(FakeContext *ctx, double ms) {
    pthread_mutex_lock(&ctx->mu);
    if (ms > 0 && !ctx->abort_flag) {
        struct timespec until;
        clock_gettime(CLOCK_MONOTONIC, &until);
        long long ns = until.tv_nsec + (long long)(ms * 1e6);
        until.tv_sec += ns / 1000000000LL;
        until.tv_nsec = ns % 1000000000LL;
        while (!ctx->abort_flag) {
            if (pthread_cond_timedwait(&ctx->cv, &ctx->mu, &until) == ETIMEDOUT) break;
        }
    }
    int ok = !ctx->abort_flag;
    pthread_mutex_unlock(&ctx->mu);
    return ok;
}

static int aborted(FakeContext *ctx) {
    pthread_mutex_lock(&ctx->mu);
    int a = ctx->abort_flag;
    pthread_mutex_unlock(&ctx->mu);
    return a;
}

static void set_running(FakeContext *ctx, int running) {
    pthread_mutex_lock(&ctx->mu);
    ctx->running = running;
    if (!running) ctx->abort_flag = 0;
    pthread_cond_broadcast(&ctx->cv);
    pthread_mutex_unlock(&ctx->mu);
}

/* Length of the longest prefix of data that does not end inside a UTF-8 character. */
static int utf8_complete(const unsigned char *data, int n) {
    for (int back = 1; back <= 4 && back <= n; back++) {
        unsigned char b = data[n - back];
        if ((b & 0xC0) == 0x80) continue;
        if (b < 0x80) return n;
        int need = (b >> 5) == 0x6 ? 2 : (b >> 4) == 0xE ? 3 : (b >> 3) == 0x1E ? 4 : 1;
        return back >= need ? n : n - back;
    }
    return n;
}

static int *volatile crash_target = NULL;

static void crash(FakeContext *ctx, int at) {
    trace(ctx, "crash token=%d mode=%d", at, ctx->crash_mode);
    fprintf(stderr, "E rkllm: (fake) crashing at token %d as the model file asks\n", at);
    fflush(stderr);
    switch (ctx->crash_mode) {
    case CRASH_ABORT: abort();
    case CRASH_KILL: raise(SIGKILL); break;
    case CRASH_EXIT: _exit(3);
    default:
        *crash_target = at; /* a NULL the compiler cannot see: a real SIGSEGV, not a trap */
    }
    _exit(99);
}

/* Deliver one callback; returns what a 1.2.1+ callback returned (0 for older releases). */
static int deliver(FakeContext *ctx, RKLLMResult *result, void *userdata, LLMCallState state) {
    void *ud = userdata ? userdata : ctx->callback_userdata;
#if FAKE_RKLLM_LAYOUT >= 121
    return ctx->callback(result, ud, state);
#else
    ctx->callback(result, ud, state);
    return 0;
#endif
}

/* Tests use this to prove a refused library was never even loaded. */
__attribute__((constructor)) static void announce_load(void) {
    const char *marker = getenv("FAKE_RKLLM_LOAD_MARKER");
    if (!marker || !*marker) return;
    FILE *f = fopen(marker, "a");
    if (!f) return;
    fprintf(f, "%d loaded %s\n", (int)getpid(), FAKE_RKLLM_VERSION);
    fclose(f);
}

/* ---------------------------------------------------------------------------------------------
 * The API
 * ------------------------------------------------------------------------------------------- */
EXPORT RKLLMParam rkllm_createDefaultParam(void) {
    RKLLMParam p;
    memset(&p, 0, sizeof p);
    p.model_path = NULL;
    p.max_context_len = 512;
    p.max_new_tokens = -1;
    p.top_k = 40;
#if FAKE_RKLLM_LAYOUT >= 120
    p.n_keep = -1;
#endif
    p.top_p = 0.9f;
    p.temperature = 0.8f;
    p.repeat_penalty = 1.1f;
    p.frequency_penalty = 0.0f;
    p.presence_penalty = 0.0f;
    p.mirostat = 0;
    p.mirostat_tau = 5.0f;
    p.mirostat_eta = 0.1f;
    p.skip_special_token = false;
    p.is_async = false;
    p.extend_param.base_domain_id = 0;
#if FAKE_RKLLM_LAYOUT >= 121
    p.extend_param.n_batch = 1;
#endif
    return p;
}

/* The largest top_k that can be a count of tokens (no vocabulary is this large). */
#define FAKE_TOP_K_MAX (1 << 20)

/* top_k as a sampler that still works would use it: k <= 0 or k larger than any vocabulary means the whole
   vocabulary (0). A value of the second kind is what a binding declaring top_k as a float sends (7.0f reads as
   1088421888): said on stderr, never refused. */
static int32_t sane_top_k(int32_t top_k, const char *where) {
    if (top_k >= 0 && top_k <= FAKE_TOP_K_MAX) return top_k;
    float as_float;
    memcpy(&as_float, &top_k, sizeof as_float);
    fprintf(stderr, "W rkllm: %s top_k %d is out of range (the bits of the float %g?); sampling from the whole "
                    "vocabulary\n", where, (int)top_k, (double)as_float);
    return 0;
}

static int check_param(const RKLLMParam *p) {
    const char *bad = NULL;
    const unsigned char *raw = (const unsigned char *)p;
    if (!p->model_path) bad = "model_path is NULL";
    else if (p->max_context_len <= 0 || p->max_context_len > 1 << 20) bad = "max_context_len";
    else if (!(p->top_p >= 0.0f && p->top_p <= 1.0f)) bad = "top_p";
    else if (!(p->temperature >= 0.0f && p->temperature <= 100.0f)) bad = "temperature";
    else if (!(p->repeat_penalty >= 0.0f && p->repeat_penalty <= 100.0f)) bad = "repeat_penalty";
    else if (!isfinite(p->frequency_penalty) || !isfinite(p->presence_penalty)) bad = "penalties";
    else if (raw[offsetof(RKLLMParam, skip_special_token)] > 1) bad = "skip_special_token";
    else if (raw[offsetof(RKLLMParam, is_async)] > 1) bad = "is_async";
#if FAKE_RKLLM_LAYOUT >= 130
    else if (raw[offsetof(RKLLMParam, ignore_eos_token)] > 1) bad = "ignore_eos_token";
#endif
#if FAKE_RKLLM_LAYOUT >= 120
    else if (p->extend_param.embed_flash < 0 || p->extend_param.embed_flash > 1) bad = "embed_flash";
#endif
#if FAKE_RKLLM_LAYOUT >= 121
    else if (p->extend_param.n_batch > 1) bad = "n_batch (the fake runs one batch)";
    else if (p->extend_param.use_cross_attn != 0) bad = "use_cross_attn";
#endif
    if (!bad) {
        for (size_t i = 0; i < sizeof p->extend_param.reserved; i++)
            if (p->extend_param.reserved[i]) bad = "extend_param.reserved is not zero";
    }
#if FAKE_RKLLM_LAYOUT < 130
    /* img_* only matter to a multimodal model: NULL and "" (what the demos and early rkllama set) are the same
       to a text model; anything else is said and ignored. */
    if (!bad && ((p->img_start && *p->img_start) || (p->img_end && *p->img_end) || (p->img_content && *p->img_content)))
        fprintf(stderr, "W rkllm: img_start/img_end/img_content are ignored: this is not a multimodal model\n");
#endif
    if (bad) {
        fprintf(stderr, "E rkllm: invalid RKLLMParam: %s (is the binding using the layout of rkllm-runtime %s?)\n",
                bad, FAKE_RKLLM_VERSION);
        return -1;
    }
    return 0;
}

#if FAKE_RKLLM_LAYOUT >= 130
EXPORT int rkllm_init(LLMHandle *handle, RKLLMParam *param, RKLLMCallback *callbacks)
#else
EXPORT int rkllm_init(LLMHandle *handle, RKLLMParam *param, LLMResultCallback callback)
#endif
{
    fprintf(stderr, BANNER, "0.9.8", "RK3588");
    if (!handle || !param) return -1;
    *handle = NULL;
    if (check_param(param) != 0) return -1;
#if FAKE_RKLLM_LAYOUT >= 130
    if (!callbacks || !callbacks->result_callback) {
        fprintf(stderr, "E rkllm: rkllm_init needs an RKLLMCallback with a result_callback\n");
        return -1;
    }
#else
    if (!callback) {
        fprintf(stderr, "E rkllm: rkllm_init needs a callback\n");
        return -1;
    }
#endif
    fprintf(stderr, "I rkllm: loading rkllm model from %s\n", param->model_path);
    FakeContext *ctx = calloc(1, sizeof(FakeContext));
    pthread_mutex_init(&ctx->mu, NULL);
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&ctx->cv, &attr);
    pthread_condattr_destroy(&attr);
    ctx->error_if_input_has = -1;
    ctx->crash_if_input_has = -1;
    ctx->hidden_layer = 1;
    if (load_model(ctx, param->model_path) != 0) {
        free_context(ctx);
        return -1;
    }
    ctx->max_context_len = param->max_context_len;
    if (ctx->max_context_len > ctx->max_context_limit) {
        fprintf(stderr, "W rkllm: max_context_len %d exceeds the model's limit %d; using %d\n", ctx->max_context_len,
                ctx->max_context_limit, ctx->max_context_limit);
        ctx->max_context_len = ctx->max_context_limit;
    }
    ctx->max_new_tokens = param->max_new_tokens;
    ctx->skip_special_token = param->skip_special_token;
    int32_t top_k = sane_top_k(param->top_k, "RKLLMParam");
    ctx->init_top_k = top_k;
    ctx->init_top_p = param->top_p;
    ctx->init_temperature = param->temperature;
    ctx->init_repeat_penalty = param->repeat_penalty;
    ctx->init_frequency_penalty = param->frequency_penalty;
    ctx->init_presence_penalty = param->presence_penalty;
    ctx->init_mirostat = param->mirostat;
#if FAKE_RKLLM_LAYOUT >= 120
    /* rkllama of 2025 sets enabled_cpus_num = cpu_count() and enabled_cpus_mask = (1 << (n + 1)) - 1 (0x1FF on an
       8-core board) and works on boards: CPUs the board lacks are ignored, with a warning. */
    unsigned int cpus_mask = param->extend_param.enabled_cpus_mask & 0xFFu;
    int cpus_num = param->extend_param.enabled_cpus_num;
    if (cpus_mask != param->extend_param.enabled_cpus_mask)
        fprintf(stderr, "W rkllm: enabled_cpus_mask 0x%x names CPUs this 8-core platform does not have; using 0x%x\n",
                param->extend_param.enabled_cpus_mask, cpus_mask);
    if (cpus_num < 0 || cpus_num > 8) {
        int usable = cpus_mask ? __builtin_popcount(cpus_mask) : 8;
        fprintf(stderr, "W rkllm: enabled_cpus_num %d is not a CPU count of this 8-core platform; using %d\n",
                cpus_num, usable);
        cpus_num = usable;
    }
#endif
#if FAKE_RKLLM_LAYOUT >= 130
    ctx->callback = callbacks->result_callback;
    ctx->callback_userdata = callbacks->result_userdata;
#else
    ctx->callback = callback;
#endif
    ctx->kv = calloc(ctx->max_context_len + 1, sizeof(int32_t));
#if FAKE_RKLLM_LAYOUT >= 120
    trace(ctx, "init version=%s ctx=%d max_new=%d top_k=%d top_p=%.3f temp=%.3f skip_special=%d cpus=%d mask=0x%x",
          FAKE_RKLLM_VERSION, ctx->max_context_len, ctx->max_new_tokens, top_k, param->top_p,
          param->temperature, (int)param->skip_special_token, cpus_num, cpus_mask);
#else
    trace(ctx, "init version=%s ctx=%d max_new=%d top_k=%d top_p=%.3f temp=%.3f skip_special=%d",
          FAKE_RKLLM_VERSION, ctx->max_context_len, ctx->max_new_tokens, top_k, param->top_p,
          param->temperature, (int)param->skip_special_token);
#endif
    if (ctx->load_ms > 0) usleep((useconds_t)(ctx->load_ms * 1000));
    fprintf(stderr, "rkllm init success\n");
    *handle = ctx;
    return 0;
}

EXPORT int rkllm_load_lora(LLMHandle handle, RKLLMLoraAdapter *lora_adapter) {
    (void)lora_adapter;
    if (!handle) return -1;
    fprintf(stderr, "E rkllm: (fake) LoRA adapters are not supported\n");
    return -1;
}


EXPORT int rkllm_abort(LLMHandle handle) {
    FakeContext *ctx = handle;
    if (!ctx) return -1;
    pthread_mutex_lock(&ctx->mu);
    int was_running = ctx->running;
    if (ctx->running && !ctx->ignore_abort) ctx->abort_flag = 1; /* ignore_abort: a hung runtime */
    pthread_cond_broadcast(&ctx->cv);
    pthread_mutex_unlock(&ctx->mu);
    trace(ctx, "abort running=%d", was_running);
    return 0;
}

EXPORT int rkllm_is_running(LLMHandle handle) {
    FakeContext *ctx = handle;
    if (!ctx) return -1;
    pthread_mutex_lock(&ctx->mu);
    int running = ctx->running;
    pthread_mutex_unlock(&ctx->mu);
#if FAKE_RKLLM_LAYOUT >= 130
    return running ? 1 : 0; /* documented: 1 if a task is running */
#else
    return running ? 0 : 1; /* documented: 0 if a task is running */
#endif
}

EXPORT int rkllm_destroy(LLMHandle handle) {
    FakeContext *ctx = handle;
    if (!ctx) return -1;
    pthread_mutex_lock(&ctx->mu);
    if (ctx->running) {
        ctx->abort_flag = 1;
        pthread_cond_broadcast(&ctx->cv);
        while (ctx->running) pthread_cond_wait(&ctx->cv, &ctx->mu);
    }
    ctx->destroyed = 1;
    pthread_mutex_unlock(&ctx->mu);
    trace(ctx, "destroy");
    free_context(ctx);
    return 0;
}

static uint32_t fnv1a(const int32_t *ids, int n) {
    uint32_t h = 2166136261u;
    for (int i = 0; i < n; i++) {
        uint32_t v = (uint32_t)ids[i];
        for (int b = 0; b < 4; b++) {
            h ^= (v >> (8 * b)) & 0xFF;
            h *= 16777619u;
        }
    }
    return h;
}

static int run_tokens(FakeContext *ctx, const int32_t *in, int n_in, int keep, int limit, RKLLMInferParam *infer,
                      void *userdata);

/* ---------------------------------------------------------------------------------------------
 * Prompt caches (see the header comment): a text file
 *   RKLLM-FAKE-PROMPT-CACHE 1 / runtime=<major.minor> / model=<hash> / n=<count> / ids=<id>,... / checksum=<fnv>
 * ------------------------------------------------------------------------------------------- */
static const char CACHE_MAGIC[] = "RKLLM-FAKE-PROMPT-CACHE 1";

/* crash_in_save: about half of `body` to the temporary name and to `path` itself, then die mid-save. */
static void crash_while_saving(FakeContext *ctx, const char *tmp, const char *path, const char *body, size_t size,
                               int n) {
    size_t half = size / 2;
    const char *targets[2] = {tmp, path};
    for (int k = 0; k < 2; k++) {
        FILE *f = fopen(targets[k], "w");
        if (!f) continue;
        fwrite(body, 1, half, f);
        fclose(f);
    }
    trace(ctx, "prompt_cache save crash n=%d bytes=%zu of %zu", n, half, size);
    fprintf(stderr, "E rkllm: (fake) crashing while saving the prompt cache %s as the model file asks\n", path);
    fflush(stderr);
    raise(SIGKILL);
    _exit(99);
}

static void save_prompt_cache(FakeContext *ctx, const char *path, int n) {
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp%d", path, (int)getpid());
    char *body = NULL;
    size_t size = 0;
    FILE *mem = open_memstream(&body, &size);
    if (!mem) {
        fprintf(stderr, "E rkllm: failed to save the prompt cache to %s: %s\n", path, strerror(errno));
        return;
    }
    int major = 0, minor = 0;
    sscanf(FAKE_RKLLM_VERSION, "%d.%d", &major, &minor);
    fprintf(mem, "%s\nruntime=%d.%d\nmodel=%08x\nn=%d\nids=", CACHE_MAGIC, major, minor, ctx->model_id, n);
    for (int i = 0; i < n; i++) fprintf(mem, i ? ",%d" : "%d", ctx->kv[i]);
    fprintf(mem, "\nchecksum=%08x\n", fnv1a(ctx->kv, n));
    fclose(mem);
    if (ctx->crash_in_save) crash_while_saving(ctx, tmp, path, body, size, n);
    FILE *f = fopen(tmp, "w");
    if (!f) {
        fprintf(stderr, "E rkllm: failed to save the prompt cache to %s: %s\n", path, strerror(errno));
        free(body);
        return;
    }
    int failed = fwrite(body, 1, size, f) != size;
    free(body);
    failed |= ferror(f);
    failed |= fclose(f) != 0;
    if (failed || rename(tmp, path) != 0) {
        fprintf(stderr, "E rkllm: failed to save the prompt cache to %s: %s\n", path, strerror(errno));
        unlink(tmp);
        return;
    }
    trace(ctx, "prompt_cache save n=%d", n);
}

/* Reads a cache file into *ids; returns its count, or -1 after saying why on stderr. */
static int read_prompt_cache(FakeContext *ctx, const char *path, int32_t **ids_out) {
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "E rkllm: failed to open prompt cache %s: %s\n", path, strerror(errno));
        return -1;
    }
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    int magic = 0, has_model = 0, has_sum = 0, n = -1, got = 0, major = -1, minor = -1, id_overflow = 0;
    unsigned int model = 0, sum = 0;
    int32_t *ids = NULL;
    while ((len = getline(&line, &cap, f)) > 0) {
        while (len && (line[len - 1] == '\n' || line[len - 1] == '\r')) line[--len] = 0;
        if (!magic) {
            magic = strcmp(line, CACHE_MAGIC) == 0 ? 1 : -1;
            if (magic < 0) break;
        } else if (!strncmp(line, "runtime=", 8)) sscanf(line + 8, "%d.%d", &major, &minor);
        else if (!strncmp(line, "model=", 6)) has_model = sscanf(line + 6, "%x", &model) == 1;
        else if (!strncmp(line, "n=", 2)) n = atoi(line + 2);
        else if (!strncmp(line, "checksum=", 9)) has_sum = sscanf(line + 9, "%x", &sum) == 1;
        else if (!strncmp(line, "ids=", 4) && n >= 0 && n <= 1 << 22) {
            IdList list = {0};
            parse_ids(line + 4, &list);
            ids = list.ids;
            got = list.n;
            id_overflow = got > n;
        }
    }
    free(line);
    fclose(f);
    const char *why = NULL;
    char version[32];
    snprintf(version, sizeof version, "%d.%d", major, minor);
    if (magic != 1) why = "not a prompt cache file";
    else if (!same_line(version, FAKE_RKLLM_VERSION)) why = "saved by another runtime release";
    else if (!has_model || model != ctx->model_id) why = "saved with another model";
    else if (n < 0 || !ids || got != n || id_overflow || !has_sum) why = "truncated or corrupt";
    else if (fnv1a(ids, n) != sum) why = "checksum mismatch (corrupt)";
    else if (n > ctx->max_context_len) why = "longer than max_context_len";
    if (why) {
        fprintf(stderr, "E rkllm: invalid prompt cache %s: %s\n", path, why);
        free(ids);
        return -1;
    }
    *ids_out = ids;
    return n;
}

EXPORT int rkllm_load_prompt_cache(LLMHandle handle, const char *prompt_cache_path) {
    FakeContext *ctx = handle;
    if (!ctx) return -1;
    if (!prompt_cache_path) {
        fprintf(stderr, "E rkllm: rkllm_load_prompt_cache: prompt_cache_path is NULL\n");
        return -1;
    }
    pthread_mutex_lock(&ctx->mu);
    int running = ctx->running;
    pthread_mutex_unlock(&ctx->mu);
    if (running) {
        fprintf(stderr, "E rkllm: rkllm_load_prompt_cache while a run is in progress\n");
        return -1;
    }
    int32_t *ids = NULL;
    int n = read_prompt_cache(ctx, prompt_cache_path, &ids);
    if (n < 0) return -1;
    if (ctx->cache_load_ms > 0 && n > 0) usleep((useconds_t)(ctx->cache_load_ms * n * 1000));
    free(ctx->cache);
    ctx->cache = ids;
    ctx->cache_len = n;
    memcpy(ctx->kv, ids, sizeof(int32_t) * n); /* the KV state the file describes */
    ctx->kv_len = n;
    trace(ctx, "prompt_cache load n=%d", n);
    fprintf(stderr, "I rkllm: loaded prompt cache %s (%d tokens)\n", prompt_cache_path, n);
    return 0;
}

EXPORT int rkllm_release_prompt_cache(LLMHandle handle) {
    FakeContext *ctx = handle;
    if (!ctx) return -1;
    free(ctx->cache);
    ctx->cache = NULL;
    ctx->cache_len = 0;
    trace(ctx, "prompt_cache release");
    return 0;
}

/* Pseudo-tokens for prompt input: one per 4 bytes (about a real token's worth of text) of the system prompt (only
   on an empty history), the prefix, the text and the postfix. The fake has no tokenizer; this is enough to choose
   an answer, pace the prefill and cache prefixes. */
static int32_t *prompt_to_ids(FakeContext *ctx, const char *text, int *n_out) {
    const char *parts[4] = {ctx->kv_len == 0 ? ctx->chat_system : NULL, ctx->chat_prefix, text, ctx->chat_postfix};
    size_t total = 0;
    for (int k = 0; k < 4; k++) total += parts[k] ? strlen(parts[k]) : 0;
    int32_t *ids = calloc(total / 4 + 2, sizeof(int32_t));
    size_t at = 0;
    for (int k = 0; k < 4; k++)
        for (const unsigned char *c = (const unsigned char *)parts[k]; c && *c; c++, at++)
            ids[at / 4] |= (int32_t)(*c & (at % 4 == 3 ? 0x3F : 0xFF)) << (8 * (at % 4));
    *n_out = (int)((total + 3) / 4);
    return ids;
}

static int run_generation(FakeContext *ctx, RKLLMInput *input, RKLLMInferParam *infer, void *userdata) {
    const char *bad = NULL;
    if (!input || !infer) bad = "NULL input or infer params";
    else if (input->input_type != RKLLM_INPUT_TOKEN && input->input_type != RKLLM_INPUT_PROMPT)
        bad = "the fake runtime takes token or prompt input only";
    else if (input->input_type == RKLLM_INPUT_PROMPT && !input->prompt_input) bad = "prompt_input is NULL";
    else if (input->input_type == RKLLM_INPUT_TOKEN && (!input->token_input.input_ids || input->token_input.n_tokens == 0))
        bad = "empty token input";
    else if (input->input_type == RKLLM_INPUT_TOKEN && input->token_input.n_tokens > (size_t)1 << 20)
        bad = "token_input.n_tokens is absurd";
    else if (infer->mode != RKLLM_INFER_GENERATE && infer->mode != RKLLM_INFER_GET_LAST_HIDDEN_LAYER)
        bad = "infer mode is not GENERATE or GET_LAST_HIDDEN_LAYER (the fake computes no logits)";
    else if (infer->lora_params) bad = "lora_params must be NULL (no LoRA loaded)";
#if FAKE_RKLLM_LAYOUT >= 120
    else if (infer->keep_history != 0 && infer->keep_history != 1) bad = "keep_history is not 0/1";
#endif
#if FAKE_RKLLM_LAYOUT >= 121
    else if (input->role && strcmp(input->role, "user") && strcmp(input->role, "tool")) bad = "role";
    else if (((const unsigned char *)input)[offsetof(RKLLMInput, enable_thinking)] > 1) bad = "enable_thinking";
#endif
#if FAKE_RKLLM_LAYOUT >= 130
    /* the same checks as RKLLMParam's at rkllm_init: a binding with a wrong struct fails here */
    else if (infer->sampling_params && !(infer->sampling_params->top_p >= 0 && infer->sampling_params->top_p <= 1))
        bad = "sampling_params.top_p";
    else if (infer->sampling_params &&
             !(infer->sampling_params->temperature >= 0.0f && infer->sampling_params->temperature <= 100.0f))
        bad = "sampling_params.temperature";
    else if (infer->sampling_params &&
             !(infer->sampling_params->repeat_penalty >= 0.0f && infer->sampling_params->repeat_penalty <= 100.0f))
        bad = "sampling_params.repeat_penalty";
    else if (infer->sampling_params && (!isfinite(infer->sampling_params->frequency_penalty) ||
                                        !isfinite(infer->sampling_params->presence_penalty)))
        bad = "sampling_params penalties";
#endif
    if (bad) {
        fprintf(stderr, "E rkllm: rkllm_run: %s\n", bad);
        return -1;
    }
    if (input->input_type == RKLLM_INPUT_TOKEN) {
        for (size_t i = 0; i < input->token_input.n_tokens; i++) {
            int32_t id = input->token_input.input_ids[i];
            if (id < 0 || id > 1 << 22) {
                fprintf(stderr, "E rkllm: rkllm_run: token id %d out of range\n", id);
                return -1;
            }
        }
    }
    /* the sampling this run applies: its own (1.3.0) or the init values */
    const char *sampling_from = "init";
    int32_t top_k = ctx->init_top_k, mirostat = ctx->init_mirostat;
    float top_p = ctx->init_top_p, temperature = ctx->init_temperature, repeat = ctx->init_repeat_penalty,
          frequency = ctx->init_frequency_penalty, presence = ctx->init_presence_penalty;
#if FAKE_RKLLM_LAYOUT >= 130
    if (infer->sampling_params) {
        const RKLLMSamplingParam *sp = infer->sampling_params;
        sampling_from = "run";
        top_k = sane_top_k(sp->top_k, "RKLLMSamplingParam");
        top_p = sp->top_p;
        temperature = sp->temperature;
        repeat = sp->repeat_penalty;
        frequency = sp->frequency_penalty;
        presence = sp->presence_penalty;
        mirostat = sp->mirostat;
    }
#endif
    int keep = 0;
#if FAKE_RKLLM_LAYOUT >= 120
    keep = infer->keep_history;
#endif
    int limit = ctx->max_new_tokens;
#if FAKE_RKLLM_LAYOUT >= 130
    if (infer->max_new_tokens > 0) limit = infer->max_new_tokens; /* <= 0 (Ollama's num_predict -1, -2): the init value */
#endif
    if (infer->mode == RKLLM_INFER_GENERATE)
        trace(ctx, "sampling from=%s top_k=%d top_p=%.3f temp=%.3f repeat=%.3f freq=%.3f presence=%.3f mirostat=%d "
                   "max_new=%d",
              sampling_from, (int)top_k, top_p, temperature, repeat, frequency, presence, (int)mirostat, limit);
    if (!keep) ctx->kv_len = 0;
    if (input->input_type == RKLLM_INPUT_TOKEN)
        return run_tokens(ctx, input->token_input.input_ids, (int)input->token_input.n_tokens, keep, limit, infer,
                          userdata);
    int n_ids = 0;
    int32_t *ids = prompt_to_ids(ctx, input->prompt_input, &n_ids);
    int rc = run_tokens(ctx, ids, n_ids, keep, limit, infer, userdata);
    free(ids);
    return rc;
}

static void save_prompt_cache(FakeContext *ctx, const char *path, int n);

/* RKLLM_INFER_GET_LAST_HIDDEN_LAYER: one callback with the last layer's hidden states of the n tokens just
   prefilled (num_tokens x embd_size floats, a function of the context up to each token; 1.1.x reports it in
   its own state RKLLM_RUN_GET_LAST_HIDDEN_LAYER = 4, later releases in NORMAL), valid during the callback. */
static void deliver_hidden(FakeContext *ctx, RKLLMResult *result, void *userdata, int n) {
    int embd = ctx->embd_size;
    float *states = malloc(sizeof(float) * (size_t)(n > 0 ? n : 1) * embd);
    int start = ctx->kv_len - n;
    for (int t = 0; t < n; t++) {
        uint32_t seed = fnv1a(ctx->kv, start + t + 1);
        for (int i = 0; i < embd; i++) {
            uint32_t x = (seed ^ (uint32_t)i * 2654435761u) * 2246822519u;
            states[(size_t)t * embd + i] = (float)((x >> 8) & 0xFFFF) / 32768.0f - 1.0f;
        }
    }
    result->text = NULL;
    result->token_id = -1;
    result->last_hidden_layer.hidden_states = states;
    result->last_hidden_layer.embd_size = embd;
    result->last_hidden_layer.num_tokens = n;
    trace(ctx, "hidden n=%d embd=%d", n, embd);
    deliver(ctx, result, userdata, FAKE_RKLLM_LAYOUT == 114 ? (LLMCallState)4 : RKLLM_RUN_NORMAL);
    memset(&result->last_hidden_layer, 0, sizeof result->last_hidden_layer);
    free(states);
}

/* Runs on the token ids `in`, after the history has been kept or dropped. */
static int run_tokens(FakeContext *ctx, const int32_t *in, int n_in, int keep, int limit, RKLLMInferParam *infer,
                      void *userdata) {
    RKLLMResult result;
    trace(ctx, "run keep=%d n=%d kv_before=%d", keep, n_in, ctx->kv_len);
    if (ctx->kv_len == 0 && ctx->cache_len > 0 && n_in >= ctx->cache_len &&
        memcmp(in, ctx->cache, sizeof(int32_t) * ctx->cache_len) == 0) {
        /* the input extends the loaded prompt cache: restore it and prefill the rest (at least the last token) */
        int reuse = ctx->cache_len < n_in ? ctx->cache_len : n_in - 1;
        memcpy(ctx->kv, ctx->cache, sizeof(int32_t) * reuse);
        ctx->kv_len = reuse;
        in += reuse;
        n_in -= reuse;
        trace(ctx, "prompt_cache reuse n=%d", reuse);
    }
    const char *save_path = infer->prompt_cache_params && infer->prompt_cache_params->save_prompt_cache
                                ? infer->prompt_cache_params->prompt_cache_path
                                : NULL;
    int prefilled_kv = -1;
    memset(&result, 0, sizeof result);
    result.token_id = -1;
    if (ctx->kv_len + n_in > ctx->max_context_len) {
        fprintf(stderr, "E rkllm: the prompt (%d tokens, %d cached) exceeds max_context_len %d\n", n_in,
                ctx->kv_len, ctx->max_context_len);
        deliver(ctx, &result, userdata, RKLLM_RUN_ERROR);
        return -1;
    }
    int has_error_trigger = ctx->error_if_input_has < 0, has_crash_trigger = ctx->crash_if_input_has < 0;
    for (int i = 0; i < n_in; i++) {
        if (in[i] == ctx->error_if_input_has) has_error_trigger = 1;
        if (in[i] == ctx->crash_if_input_has) has_crash_trigger = 1;
    }
    double t0 = now_ms();
    int generated = 0, was_aborted = 0, paused = 0;
    double t_prefilled = t0;
    if (!pace(ctx, ctx->prefill_base_ms + ctx->prefill_ms * n_in)) {
        was_aborted = 1;
    } else {
        memcpy(ctx->kv + ctx->kv_len, in, sizeof(int32_t) * n_in);
        ctx->kv_len += n_in;
        prefilled_kv = ctx->kv_len;
        t_prefilled = now_ms();
        const IdList *answer = &ctx->answers[fnv1a(ctx->kv, ctx->kv_len) % (uint32_t)ctx->n_answers];
        int room = ctx->max_context_len - ctx->kv_len;
        int n_out = infer->mode == RKLLM_INFER_GET_LAST_HIDDEN_LAYER ? 0 : answer->n;
        if (infer->mode == RKLLM_INFER_GET_LAST_HIDDEN_LAYER && ctx->hidden_layer)
            deliver_hidden(ctx, &result, userdata, n_in);
        if (limit > 0 && n_out > limit) n_out = limit;
        if (n_out > room) n_out = room;
        unsigned char pending[16], text[4096];
        int pending_len = 0;
        for (int i = 0; i < n_out; i++) {
            if (i > 0 && !pace(ctx, ctx->decode_ms)) {
                was_aborted = 1;
                break;
            }
            if (aborted(ctx)) {
                was_aborted = 1;
                break;
            }
            if (has_crash_trigger && ctx->crash_at == i + 1) crash(ctx, i + 1);
            if (has_error_trigger && ctx->error_at == i + 1) {
                trace(ctx, "error token=%d", i + 1);
                fprintf(stderr, "E rkllm: (fake) reporting an error at token %d as the model file asks\n", i + 1);
                result.text = NULL;
                result.token_id = -1;
                deliver(ctx, &result, userdata, RKLLM_RUN_ERROR);
                return -1;
            }
            if (i > 0) ctx->kv[ctx->kv_len++] = answer->ids[i - 1]; /* the previous token is fed first */
            int32_t id = answer->ids[i];
            int is_stop = id_in(&ctx->stop, id);
            const unsigned char *bytes = (const unsigned char *)"";
            int n_bytes = 0;
            if (!(ctx->skip_special_token && id_in(&ctx->special, id)) && id < ctx->piece_cap &&
                ctx->piece_len[id] >= 0) {
                bytes = ctx->piece[id];
                n_bytes = ctx->piece_len[id];
            }
            if (is_stop) {
                if (ctx->emit_eos) {
                    memcpy(text, bytes, n_bytes);
                    text[n_bytes] = 0;
                    result.text = (const char *)text;
                    result.token_id = id;
                    deliver(ctx, &result, userdata, RKLLM_RUN_NORMAL);
                }
                break;
            }
            if (pending_len + n_bytes >= (int)sizeof text) n_bytes = 0; /* pieces are short; never overflow */
            unsigned char all[4096 + 16];
            memcpy(all, pending, pending_len);
            memcpy(all + pending_len, bytes, n_bytes);
            int total = pending_len + n_bytes;
            int cut = utf8_complete(all, total);
            LLMCallState state = (cut > 0 || cut == total) ? RKLLM_RUN_NORMAL : RKLLM_RUN_WAITING;
            int text_len;
            if (ctx->waiting_style == WAIT_PARTIAL) {
                memcpy(text, bytes, n_bytes); /* this token's own bytes, split character or not */
                text_len = n_bytes;
                state = cut == total ? RKLLM_RUN_NORMAL : RKLLM_RUN_WAITING;
            } else if (ctx->waiting_style == WAIT_RESTATE && state == RKLLM_RUN_WAITING) {
                memcpy(text, all, total); /* everything held back so far, again */
                text_len = total;
            } else {
                memcpy(text, all, cut);
                text_len = cut;
            }
            if (total - cut > (int)sizeof pending) cut = total; /* cannot happen with UTF-8 */
            pending_len = total - cut;
            memmove(pending, all + cut, pending_len);
            text[text_len] = 0;
            result.text = (const char *)text;
            result.token_id = id;
            int rc = deliver(ctx, &result, userdata, state);
            memset(text, 0xA5, (size_t)text_len + 1); /* the pointer was only valid during the callback */
            text[text_len] = 0;
            generated++;
            if (rc == 1) {
                paused = 1;
                break;
            }
        }
    }
    double t_end = now_ms();
    memset(&result, 0, sizeof result);
    result.token_id = -1;
#if FAKE_RKLLM_LAYOUT >= 121
    result.perf.prefill_time_ms = (float)(t_prefilled - t0);
    result.perf.prefill_tokens = n_in;
    result.perf.generate_time_ms = (float)(t_end - t_prefilled);
    result.perf.generate_tokens = generated;
    result.perf.memory_usage_mb = 100.0f + ctx->kv_len / 64.0f;
#endif
    (void)t_end;
    (void)t_prefilled;
    if (save_path && prefilled_kv >= 0) save_prompt_cache(ctx, save_path, prefilled_kv);
    trace(ctx, "end generated=%d aborted=%d paused=%d kv=%d", generated, was_aborted, paused, ctx->kv_len);
    if (paused) return 0;
    if (!was_aborted || ctx->finish_after_abort) deliver(ctx, &result, userdata, RKLLM_RUN_FINISH);
    return 0;
}

EXPORT int rkllm_run(LLMHandle handle, RKLLMInput *rkllm_input, RKLLMInferParam *rkllm_infer_params,
                     void *userdata) {
    FakeContext *ctx = handle;
    if (!ctx) return -1;
    pthread_mutex_lock(&ctx->mu);
    if (ctx->running) {
        pthread_mutex_unlock(&ctx->mu);
        fprintf(stderr, "E rkllm: rkllm_run while another run is in progress\n");
        return -1;
    }
    ctx->running = 1;
    ctx->abort_flag = 0;
    pthread_mutex_unlock(&ctx->mu);
    int rc = run_generation(ctx, rkllm_input, rkllm_infer_params, userdata);
    set_running(ctx, 0);
    return rc;
}

typedef struct {
    FakeContext *ctx;
    RKLLMInput *input;
    RKLLMInferParam *infer;
    void *userdata;
} AsyncRun;

static void *async_main(void *arg) {
    AsyncRun *run = arg;
    run_generation(run->ctx, run->input, run->infer, run->userdata);
    set_running(run->ctx, 0);
    free(run);
    return NULL;
}

EXPORT int rkllm_run_async(LLMHandle handle, RKLLMInput *rkllm_input, RKLLMInferParam *rkllm_infer_params,
                           void *userdata) {
    FakeContext *ctx = handle;
    if (!ctx) return -1;
    pthread_mutex_lock(&ctx->mu);
    if (ctx->running) {
        pthread_mutex_unlock(&ctx->mu);
        return -1;
    }
    ctx->running = 1;
    ctx->abort_flag = 0;
    pthread_mutex_unlock(&ctx->mu);
    AsyncRun *run = malloc(sizeof *run);
    *run = (AsyncRun){ctx, rkllm_input, rkllm_infer_params, userdata};
    pthread_t thread;
    if (pthread_create(&thread, NULL, async_main, run) != 0) {
        free(run);
        set_running(ctx, 0);
        return -1;
    }
    pthread_detach(thread);
    return 0;
}

#if FAKE_RKLLM_LAYOUT >= 120
#if FAKE_RKLLM_LAYOUT == 120
EXPORT int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt)
#else
EXPORT int rkllm_clear_kv_cache(LLMHandle handle, int keep_system_prompt, int *start_pos, int *end_pos)
#endif
{
    FakeContext *ctx = handle;
    if (!ctx) return -1;
    pthread_mutex_lock(&ctx->mu);
    int running = ctx->running;
    pthread_mutex_unlock(&ctx->mu);
    if (running) {
        fprintf(stderr, "E rkllm: rkllm_clear_kv_cache while a run is in progress\n");
        return -1;
    }
    if (keep_system_prompt != 0 && keep_system_prompt != 1) return -1;
#if FAKE_RKLLM_LAYOUT >= 121
    if (start_pos && end_pos) {
        int s = start_pos[0] < 0 ? 0 : start_pos[0], e = end_pos[0] > ctx->kv_len ? ctx->kv_len : end_pos[0];
        if (s < e) {
            memmove(ctx->kv + s, ctx->kv + e, sizeof(int32_t) * (ctx->kv_len - e));
            ctx->kv_len -= e - s;
        }
        trace(ctx, "clear range=%d-%d kv=%d", s, e, ctx->kv_len);
        return 0;
    }
#endif
    ctx->kv_len = 0; /* token input carries no separate system prompt: everything goes */
    trace(ctx, "clear keep_system_prompt=%d kv=0", keep_system_prompt);
    return 0;
}

EXPORT int rkllm_set_chat_template(LLMHandle handle, const char *system_prompt, const char *prompt_prefix,
                                   const char *prompt_postfix) {
    FakeContext *ctx = handle;
    if (!ctx) return -1;
    free(ctx->chat_system);
    free(ctx->chat_prefix);
    free(ctx->chat_postfix);
    ctx->chat_system = system_prompt ? strdup(system_prompt) : NULL;
    ctx->chat_prefix = prompt_prefix ? strdup(prompt_prefix) : NULL;
    ctx->chat_postfix = prompt_postfix ? strdup(prompt_postfix) : NULL;
    trace(ctx, "set_chat_template system=%s prefix=%s postfix=%s", system_prompt ? system_prompt : "(null)",
          prompt_prefix ? prompt_prefix : "(null)", prompt_postfix ? prompt_postfix : "(null)");
    return 0;
}
#endif

#if FAKE_RKLLM_LAYOUT >= 121
EXPORT int rkllm_get_kv_cache_size(LLMHandle handle, int *cache_sizes) {
    FakeContext *ctx = handle;
    if (!ctx || !cache_sizes) return -1;
    cache_sizes[0] = ctx->kv_len;
    return 0;
}

EXPORT int rkllm_set_function_tools(LLMHandle handle, const char *system_prompt, const char *tools,
                                    const char *tool_response_str) {
    (void)system_prompt, (void)tools, (void)tool_response_str;
    return handle ? 0 : -1;
}

EXPORT int rkllm_set_cross_attn_params(LLMHandle handle, RKLLMCrossAttnParam *cross_attn_params) {
    (void)cross_attn_params;
    return handle ? 0 : -1;
}
#endif

/* ---------------------------------------------------------------------------------------------
 * Not part of rkllm.h: the fake's own struct figures, so tests can check the fake itself against
 * the table of the real headers (a fake with a wrong layout would prove nothing).
 * ------------------------------------------------------------------------------------------- */
#define S(T) n += snprintf(buf + n, sizeof buf - n, #T ".size=%zu;", sizeof(T))
#define F(T, f) n += snprintf(buf + n, sizeof buf - n, #T "." #f "=%zu;", offsetof(T, f))

EXPORT const char *fake_rkllm_layout(void) {
    static char buf[8192];
    int n = 0;
    S(RKLLMExtendParam);
    F(RKLLMExtendParam, base_domain_id);
    F(RKLLMExtendParam, reserved);
#if FAKE_RKLLM_LAYOUT >= 120
    F(RKLLMExtendParam, embed_flash);
    F(RKLLMExtendParam, enabled_cpus_num);
    F(RKLLMExtendParam, enabled_cpus_mask);
#endif
#if FAKE_RKLLM_LAYOUT >= 121
    F(RKLLMExtendParam, n_batch);
    F(RKLLMExtendParam, use_cross_attn);
#endif
    S(RKLLMParam);
    F(RKLLMParam, model_path);
    F(RKLLMParam, max_context_len);
    F(RKLLMParam, max_new_tokens);
    F(RKLLMParam, top_k);
#if FAKE_RKLLM_LAYOUT >= 120
    F(RKLLMParam, n_keep);
#endif
    F(RKLLMParam, top_p);
    F(RKLLMParam, temperature);
    F(RKLLMParam, repeat_penalty);
    F(RKLLMParam, frequency_penalty);
    F(RKLLMParam, presence_penalty);
    F(RKLLMParam, mirostat);
    F(RKLLMParam, mirostat_tau);
    F(RKLLMParam, mirostat_eta);
    F(RKLLMParam, skip_special_token);
#if FAKE_RKLLM_LAYOUT >= 130
    F(RKLLMParam, ignore_eos_token);
#endif
    F(RKLLMParam, is_async);
#if FAKE_RKLLM_LAYOUT < 130
    F(RKLLMParam, img_start);
    F(RKLLMParam, img_end);
    F(RKLLMParam, img_content);
#endif
    F(RKLLMParam, extend_param);
    S(RKLLMTokenInput);
    S(RKLLMMultiModalInput);
    S(RKLLMInput);
#if FAKE_RKLLM_LAYOUT >= 121
    F(RKLLMInput, role);
    F(RKLLMInput, enable_thinking);
#endif
    F(RKLLMInput, input_type);
    F(RKLLMInput, token_input);
    S(RKLLMInferParam);
    F(RKLLMInferParam, mode);
    F(RKLLMInferParam, lora_params);
    F(RKLLMInferParam, prompt_cache_params);
#if FAKE_RKLLM_LAYOUT >= 130
    F(RKLLMInferParam, sampling_params);
    F(RKLLMInferParam, max_new_tokens);
    S(RKLLMSamplingParam);
    S(RKLLMCallback);
    F(RKLLMCallback, result_callback);
    F(RKLLMCallback, embed_userdata);
#endif
#if FAKE_RKLLM_LAYOUT >= 120
    F(RKLLMInferParam, keep_history);
#endif
    S(RKLLMResult);
    F(RKLLMResult, text);
    F(RKLLMResult, token_id);
    F(RKLLMResult, last_hidden_layer);
#if FAKE_RKLLM_LAYOUT >= 120
    F(RKLLMResult, logits);
#endif
#if FAKE_RKLLM_LAYOUT >= 121
    F(RKLLMResult, perf);
    S(RKLLMPerfStat);
#endif
    return buf;
}
