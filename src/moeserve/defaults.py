"""Defaults: each default of moeserve defined once; options, dataclasses and docs read them from here."""

# Expert functions (Remoe [II], MoEless): idle seconds before a function is stopped (scale to zero).
KEEP_ALIVE_S = 60.0
# Expert functions: seconds the main process polls shared memory for an answer before it sleeps on an
# eventfd, and a function for its next call (short: at decode the next call is a whole token away).
FUNCTION_SPIN_S = 200e-6
FUNCTION_IDLE_SPIN_S = 50e-6
# MoEless: an expert is a straggler when its load exceeds this multiple of its layer's mean load.
STRAGGLER_THRESHOLD = 1.5

# Planning: SLOs, the probability the TTFT bound holds, and the profiles a plan is costed with.
SLO_TTFT_S = 2.0
SLO_TPOT_S = 0.25
CONFIDENCE = 0.95
CPU_HARDWARE = "cpu-2core"
# GPU profile: "auto" = the detected GPU's shipped profile, else "none" (CPU-only shapes); or a name/path
GPU_HARDWARE = "auto"
PRICING = ("aws-lambda-x86", "modal-a100-80gb")

# The serving engine.
MAX_BATCH = 8
MAX_QUEUE = 64
MAX_PREFILL_TOKENS = 512  # prompt tokens per engine step: longer prompts are prefilled in chunks
DEFAULT_MAX_TOKENS = 16  # when a request does not say

# The HTTP server.
MAX_BODY_BYTES = 4 << 20
REQUEST_TIMEOUT_S = 600.0

# --expert-cache (docs/expert-cache.md): the eviction policy and whether the next layer is read ahead
EXPERT_CACHE_POLICIES = ("lru", "lfu")  # the simulator's policies that run online (Belady needs the future)
EXPERT_CACHE_PREFETCHES = ("none", "router")
EXPERT_CACHE_POLICY = "lru"
EXPERT_CACHE_PREFETCH = "none"

# The Ray Serve backend: most replicas Serve's autoscaler may give one expert function, and the in-flight
# calls per replica it aims at (one layer call at a time: more queue -> another replica).
RAY_MAX_REPLICAS = 2
RAY_TARGET_ONGOING_REQUESTS = 1.0
# A layer call of at least twice this many tokens is split over the function's replicas (at least two parts:
# one engine sends one call per function at a time, so only split calls let Serve see more than one request
# in flight and add a replica; docs/scale-out.md)
RAY_SPLIT_MIN_TOKENS = 16
