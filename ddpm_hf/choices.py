"""Every choice list, defined once. No heavy imports here: the command lines read these before torch loads."""

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")
# what the UNet predicts; ddpm_hf.diffusion.scheduler.PARAMETERIZATIONS holds the math of each
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
# σ_t² of the reverse process; the learned ones need a UNet with 2C output channels
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")
# the variance types a training run can use
TRAINING_VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range", "learned")
# training objectives: L_simple (Eq. 14), the variational bound (Eq. 5), improved DDPM's L_hybrid
LOSSES = ("simple", "vlb", "hybrid")
# the loss weights of progressive distillation (Salimans & Ho 2022, Sec. 4): max(SNR, 1) and SNR + 1
DISTILL_WEIGHTINGS = ("truncated-snr", "snr+1")
# what a distilled student may predict: not ε, whose x̂ = (z - σ ε̂)/α is ill-conditioned where α → 0
STUDENT_PREDICTIONS = ("v_prediction", "sample")
# the network's dtype when sampling (the chain itself stays float32); fp16 only on a GPU
SAMPLING_DTYPES = ("fp32", "bf16", "fp16")
# the precision post-hoc EMA's snapshots are kept in (EDM2 keeps fp16)
SNAPSHOT_DTYPES = ("fp16", "fp32")
# how the training timestep t is drawn: uniformly, or by improved DDPM's importance sampling
TIMESTEP_SAMPLERS = ("uniform", "loss-second-moment")
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")
# the chains of ddpm-sample: N steps spaced by the scheduler's timestep_spacing, or the DDIM paper's t_i ∝ i²
SAMPLING_TIMESTEPS = ("uniform", "quadratic")
# diffusers' LR schedules that need nothing beyond warmup and total steps (diffusers.optimization.SchedulerType)
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
# auto: on a CPU bf16 where it times at least 10% faster than no (fp32) before training; on a GPU bf16 where it has it
MIXED_PRECISIONS = ("no", "fp16", "bf16", "auto")
# adam: the paper's (L2 weight decay); adamw: decoupled weight decay, as diffusers' example trains
OPTIMIZERS = ("adam", "adamw")
TRACKERS = ("tensorboard", "wandb", "none")
BAD_IMAGE_POLICIES = ("stop", "skip")
# samplers of ddpm-sample
SAMPLERS = ("ddpm", "ddim", "dpm-solver")
# clean-fid's resizing protocols
FID_MODES = ("clean", "legacy_tensorflow", "legacy_pytorch")
# figures of ddpm-visualize, and the formats of its animations (auto: the smaller file)
FIGURES = ("progressive", "denoise", "forward", "interpolate")
ANIMATION_FORMATS = ("auto", "gif", "webp")
# feature spaces of ddpm-metrics and --eval_every
FEATURE_NETWORKS = ("inception", "dinov2")
# ddpm-edit --mask_half: the half of each image that RePaint fills
MASK_HALVES = ("top", "bottom", "left", "right")
# the training sets that ship with ddpm_hf (scikit-learn's digits), and short names for common image sets on the Hub
BUILTIN_DATASETS = ("digits",)
# Short names for common unconditional image sets on the Hub.
DATASET_ALIASES = {
    "cifar10": "uoft-cs/cifar10",
    "cifar100": "uoft-cs/cifar100",
    "mnist": "ylecun/mnist",
    "fashion_mnist": "zalando-datasets/fashion_mnist",
    "celeba-hq": "korexyz/celeba-hq-256x256",
    "butterflies": "huggan/smithsonian_butterflies_subset",
    "flowers": "huggan/flowers-102-categories",
    "pokemon": "huggan/pokemon",
}
# classifier-free guidance beyond this saturates every image; what is asked for above it is a typo or an overflow
MAX_GUIDANCE = 100.0
