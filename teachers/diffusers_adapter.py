"""A diffusers model folder (UNet2DModel or DiTTransformer2DModel + scheduler config) as a ``Teacher``
on our linear time axis.

Supported schedules and the change of path (t = 0 data, t = 1 noise on our axis):

- Every scheduler whose config defines training betas, i.e. whose instance has ``alphas_cumprod``
  (DDPM, DDIM, Euler, EulerAncestral, DPMSolverMultistep / Singlestep, PNDM, LMS, UniPC, Heun, DEIS,
  KDPM2, ...; ``epsilon``, ``v_prediction``, ``sample``): the discrete VP schedule x_k = sqrt(abar_k) x0
  + sqrt(1 - abar_k) eps of the scheduler's own ``alphas_cumprod`` (Ho et al. 2020, Eq. 4), as
  ``flowmap.paths.DiscreteVPPath``: train step k sits at t_k = (k + 1) / N. The scheduler class only
  chooses a sampler; the model, and so the teacher, is the same for all of them.
- Flow-matching schedulers (``FlowMatchEulerDiscreteScheduler``, ``FlowMatchHeunDiscreteScheduler``, and
  the schedulers above with ``use_flow_sigmas`` and ``prediction_type="flow_prediction"``): diffusers'
  sigma *is* our t (sigma = 1 noise, x_sigma = (1 - sigma) x0 + sigma noise) and the model predicts
  noise - x0 = our velocity; its timestep input is sigma * N (Esser et al. 2024, Sec. 2). ``shift``
  moves the sampler's sigmas only, not the model.

- EDM schedulers (``EDMEulerScheduler``, ``EDMDPMSolverMultistepScheduler``): the model is EDM's raw network F
  and the folder is an EDM denoiser D(x, sigma) = c_skip x + c_out F(c_in x, log(sigma) / 4) with the scheduler's
  ``sigma_data``, ``sigma_min``, ``sigma_max`` (Karras et al. 2022, Table 1), read as
  ``flowmap.edm_velocity.EDMDenoiserTeacher`` (the VE path carried onto the linear one). This is how an EDM
  module is given as a file: a diffusers model folder (safetensors) plus its EDM scheduler config.

``clip_sample`` / ``thresholding`` clip the x0 estimate inside diffusers' sampler step, which no velocity
field does: such a folder is refused with one line unless ``allow_clip_mismatch=True``;
``teachers.diffusers_sampler`` emulates diffusers' DDIM with the clipping exactly.

For the VP schedules the model is evaluated through x_lin = x / (alpha + sigma), t_lin = sigma /
(alpha + sigma) (``flowmap.paths``): for t_lin we solve sigma / alpha = t_lin / (1 - t_lin) for the
fractional step position in float64, call the model at its timestep, turn its prediction into
(x0, eps) (``flowmap.predictions.to_x0_eps``) and return

    v_lin = eps - x0                                        (velocity of the linear path)

which is exact: (x0, eps) do not depend on the path, only the coordinates do. DDIM (eta = 0) is
Euler's method in these coordinates (Song et al. 2021a, Eq. 13-14; Karras et al. 2022, Sec. 3), so
Euler on the grid of DDIM's timesteps reproduces diffusers' DDIM sampler (tests/test_diffusers_teacher.py).

Timestep map and interpolation. t on the VP axis corresponds to the fractional step tau = N t - 1
(t_k = (k + 1) / N <-> timestep k); log abar is linear in t between steps (DiscreteVPPath). A time
within ``SNAP`` of a train step (float32 round-off of a grid time) is evaluated exactly at that step;
between steps the model receives the fractional timestep tau (its sinusoidal time embedding is
defined for real timesteps), an interpolation it was not trained on. Below the first step
(t < 1 / N) the model is called at timestep 0; above the last step (t_lin beyond the schedule's
largest noise level) at timestep N - 1 with the last step's alpha, sigma.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from flowmap.diffusers_velocity import DiffusersNet, DiffusersTeacher, require_diffusers  # noqa: F401 (re-exported)
from flowmap.edm_velocity import EDMDenoiserTeacher
from flowmap.io import CheckpointError
from flowmap.paths import AffinePath, DiscreteVPPath, LinearPath

MODELS = ("UNet2DModel", "DiTTransformer2DModel", "UNet2DConditionModel", "SD3Transformer2DModel")
VP_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)
EDM_SCHEDULERS = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
WEIGHTS = "diffusion_pytorch_model"


# --- the folder ------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable JSON ({err})") from None


def is_diffusers_folder(path: str | Path) -> bool:
    """A folder holding ``model_index.json`` (a pipeline) or ``config.json`` with a diffusers ``_class_name``."""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / "model_index.json").is_file():
        return True
    cfg = path / "config.json"
    return cfg.is_file() and "_class_name" in _read_json(cfg)


def find_model_and_scheduler(path: str | Path) -> tuple[Path, dict, dict]:
    """(model folder, model config, scheduler config) of a pipeline folder (``model_index.json`` with
    ``unet/`` or ``transformer/`` and ``scheduler/``) or a model folder (``config.json`` next to
    ``scheduler_config.json``, or with a sibling ``../scheduler/``)."""
    root = Path(path)
    if (root / "model_index.json").is_file():
        candidates = [root / name for name in ("unet", "transformer")] + sorted(p for p in root.iterdir() if p.is_dir())
        model_dir = next(
            (
                d
                for d in candidates
                if (d / "config.json").is_file() and _read_json(d / "config.json").get("_class_name") in MODELS
            ),
            None,
        )
        if model_dir is None:
            raise CheckpointError(
                f"{root}: a diffusers pipeline folder without a supported model "
                f"(one of {list(MODELS)} in unet/ or transformer/)"
            )
        sched_files = [root / "scheduler" / "scheduler_config.json"]
    elif (root / "config.json").is_file():
        model_dir = root
        sched_files = [root / "scheduler_config.json", root.parent / "scheduler" / "scheduler_config.json"]
    else:
        raise CheckpointError(
            f"{root}: not a diffusers folder (expected model_index.json, or config.json with scheduler_config.json)"
        )
    model_cfg = _read_json(model_dir / "config.json")
    name = model_cfg.get("_class_name")
    if name not in MODELS:
        raise CheckpointError(f"{model_dir}: unsupported diffusers model class {name!r}; supported: {list(MODELS)}")
    sched_file = next((f for f in sched_files if f.is_file()), None)
    if sched_file is None:
        raise CheckpointError(
            f"{root}: no scheduler config (looked for {[str(f) for f in sched_files]}); the noise schedule and "
            "prediction type come from it (save one with scheduler.save_pretrained(folder))"
        )
    return model_dir, model_cfg, _read_json(sched_file)


# VP_SCHEDULERS are examples only: every scheduler with training betas is read (schedule_from_config)
FLOW_MATCH_SCHEDULERS = (*FLOW_SCHEDULERS, "FlowMatchHeunDiscreteScheduler")
# schedulers of consistency-distilled models: their network is a student, not a diffusion teacher
CONSISTENCY_SCHEDULERS = (
    "LCMScheduler",
    "TCDScheduler",
    "FlowMatchLCMScheduler",
    "CMStochasticIterativeScheduler",
    "SCMScheduler",
)


def schedule_from_config(config: dict) -> tuple[AffinePath, str, int]:
    """(path, our prediction name, num_train_timesteps) of a diffusers scheduler config; one clear
    error for a scheduler or setting that has no exact counterpart here."""
    name = config.get("_class_name")
    N = int(config.get("num_train_timesteps", 1000))
    kind = config.get("prediction_type", "epsilon")
    if name in CONSISTENCY_SCHEDULERS:
        raise CheckpointError(f"{name} samples a consistency-distilled model (a student), not a diffusion teacher")
    if name in FLOW_MATCH_SCHEDULERS or config.get("use_flow_sigmas", False):
        if config.get("use_flow_sigmas", False) and kind != "flow_prediction":
            raise CheckpointError(
                f"{name} with use_flow_sigmas=True needs prediction_type='flow_prediction', got {kind!r}"
            )
        if config.get("invert_sigmas", False):
            raise CheckpointError(f"{name} with invert_sigmas=True is not supported")
        return LinearPath(), "velocity", N
    if kind not in PREDICTION_TYPES:
        raise CheckpointError(
            f"{name} with prediction_type={kind!r} is not supported; supported: {sorted(PREDICTION_TYPES)}"
        )
    if config.get("rescale_betas_zero_snr", False):
        raise CheckpointError(
            f"{name} with rescale_betas_zero_snr=True is not supported "
            "(alpha = 0 at the last step has no finite place on the linear axis)"
        )
    if config.get("timestep_type", "discrete") != "discrete":
        raise CheckpointError(
            f"{name} with timestep_type={config['timestep_type']!r} is not supported "
            "(the model's time input is not the train step)"
        )
    diffusers = require_diffusers()
    cls = getattr(diffusers, str(name), None)
    if cls is None or not hasattr(cls, "from_config"):
        raise CheckpointError(f"unknown diffusers scheduler {name!r} (diffusers {diffusers.__version__})")
    try:
        scheduler = cls.from_config(config)
    except (ImportError, TypeError, ValueError, AttributeError) as err:  # e.g. one needing torchsde
        raise CheckpointError(
            f"diffusers could not build {name} from the folder's config ({type(err).__name__}: {err})"
        ) from None
    abar = getattr(scheduler, "alphas_cumprod", None)
    if abar is None:
        raise CheckpointError(
            f"unsupported diffusers scheduler {name!r}: "
            "no training betas / alphas_cumprod and not a flow-matching scheduler; "
            "supported: any scheduler with betas (DDPM, DDIM, Euler, DPMSolverMultistep, PNDM, LMS, UniPC, Heun, ...) "
            f"and {list(FLOW_MATCH_SCHEDULERS)}"
        )
    return DiscreteVPPath(tuple(float(a) for a in torch.as_tensor(abar).double())), PREDICTION_TYPES[kind], N


def full_scheduler_config(config: dict) -> dict:
    """The folder's scheduler config with the class's defaults filled in (a key absent from the file,
    e.g. ``clip_sample`` of a DDIMScheduler, takes diffusers' default)."""
    diffusers = require_diffusers()
    cls = getattr(diffusers, str(config.get("_class_name")), None)
    try:
        full = dict(cls.from_config(config).config) if cls is not None else {}
    except (ImportError, TypeError, ValueError, AttributeError):
        full = {}
    return {**full, **config}


SCHEDULER_KEYS = (
    "num_train_timesteps",
    "beta_schedule",
    "beta_start",
    "beta_end",
    "prediction_type",
    "timestep_spacing",
    "steps_offset",
    "set_alpha_to_one",
    "clip_sample",
    "clip_sample_range",
    "thresholding",
    "rescale_betas_zero_snr",
    "timestep_type",
    "shift",
    "use_dynamic_shifting",
    "use_flow_sigmas",
    "sigma_data",
    "sigma_min",
    "sigma_max",
    "sigma_schedule",
)


def scheduler_summary(config: dict) -> dict:
    """The scheduler's class and the fields that define the teacher or its sampler (recorded in student files);
    ``trained_betas`` as its length."""
    out = {"class": config.get("_class_name")}
    out.update({k: config[k] for k in SCHEDULER_KEYS if k in config})
    if config.get("trained_betas") is not None:
        out["trained_betas"] = f"{len(config['trained_betas'])} values"
    return out


def clip_mismatch(config: dict) -> str | None:
    """What the scheduler's sampler does to the x0 estimate that a velocity field does not (None: nothing).
    diffusers applies ``thresholding`` in place of ``clip_sample`` when both are set."""
    if config.get("thresholding", False):
        return (
            f"dynamic thresholding of x0 (thresholding=True, ratio {config.get('dynamic_thresholding_ratio', 0.995)}, "
            f"max {config.get('sample_max_value', 1.0)})"
        )
    if config.get("clip_sample", False):
        r = config.get("clip_sample_range", 1.0)
        return f"clipping of x0 to [-{r}, {r}] (clip_sample=True)"
    return None


# --- the model -------------------------------------------------------------------------------------


# DiffusersNet and DiffusersTeacher live in flowmap.diffusers_velocity (the student reuses them).


def load_diffusers_teacher(
    path: str | Path, null_class: bool = False, allow_clip_mismatch: bool = False
) -> tuple[DiffusersTeacher, dict]:
    """(teacher, description) of a diffusers folder; weights from safetensors only (never pickle).

    A scheduler that clips or thresholds x0 is refused with one line unless ``allow_clip_mismatch``
    (then the description's notes say what differs)."""
    model_dir, model_cfg, sched_cfg = find_model_and_scheduler(path)
    if sched_cfg.get("_class_name") in EDM_SCHEDULERS:
        return load_edm_folder(path, model_dir, model_cfg, sched_cfg, null_class)
    spath, prediction, N = schedule_from_config(sched_cfg)  # scheduler errors before loading weights
    _require_safetensors(model_dir)
    sched_cfg = full_scheduler_config(sched_cfg)
    mismatch = clip_mismatch(sched_cfg)
    if mismatch and not allow_clip_mismatch:
        raise CheckpointError(
            f"{path}: {sched_cfg['_class_name']} applies {mismatch} at every sampling step, "
            "which the teacher's velocity field does not, so its ODE samples differ from diffusers' sampler; "
            "sample with scripts/sample.py "
            "--teacher_sampler diffusers (exact), or pass --allow_clip_mismatch to use the unclipped field"
        )
    net = DiffusersNet(_load_model(model_dir, model_cfg), null_class=null_class)
    teacher = DiffusersTeacher(net, spath, prediction, N).eval()
    teacher.scheduler_config = dict(sched_cfg)  # the sampler the folder ships (teachers.diffusers_sampler)
    notes = [f"the scheduler's {mismatch} is not applied by the velocity field"] if mismatch else []
    description = {
        "kind": "diffusers",
        "source": str(path),
        "model": model_cfg["_class_name"],
        "name": Path(path).resolve().name,
        "scheduler": sched_cfg["_class_name"],
        "scheduler_config": scheduler_summary(sched_cfg),
        "prediction": prediction,
        "diffusers_prediction": sched_cfg.get("prediction_type", "velocity (noise - x0)"),
        "path": spath.name,
        "num_train_timesteps": N,
        "data_shape": list(net.data_shape),
        "num_classes": net.num_classes,
        "null_class": net.has_null,
        "notes": notes,
    }
    attach_codec(teacher, description, path)
    attach_prompt_encoder(teacher, description, path)
    return teacher, description


def _require_safetensors(model_dir: Path) -> None:
    if (
        not any(model_dir.glob(f"{WEIGHTS}*.safetensors"))
        and not (model_dir / f"{WEIGHTS}.safetensors.index.json").is_file()
    ):
        raise CheckpointError(
            f"{model_dir}: no {WEIGHTS}.safetensors; only safetensors weights are loaded (.bin weights are pickle)"
        )


def _load_model(model_dir: Path, model_cfg: dict) -> torch.nn.Module:
    """The folder's diffusers model from safetensors only (never pickle), frozen, in eval mode."""
    _require_safetensors(model_dir)
    diffusers = require_diffusers()
    cls = getattr(diffusers, model_cfg["_class_name"])
    try:
        model = cls.from_pretrained(str(model_dir), use_safetensors=True, low_cpu_mem_usage=False)
    except Exception as err:  # diffusers raises assorted types for weights that do not fit the config
        raise CheckpointError(
            f"{model_dir}: diffusers could not load the {model_cfg['_class_name']} ({type(err).__name__}: {err})"
        ) from None
    return model.requires_grad_(False).eval()


def load_edm_folder(
    path: str | Path, model_dir: Path, model_cfg: dict, sched_cfg: dict, null_class: bool = False
) -> tuple[EDMDenoiserTeacher, dict]:
    """(teacher, description) of a model folder with an EDM scheduler: ``EDMDenoiserTeacher`` around the model
    with the scheduler's sigma_data / sigma_min / sigma_max and prediction type (c_out's sign)."""
    sched_cfg = full_scheduler_config(sched_cfg)
    kind = sched_cfg.get("prediction_type", "epsilon")
    if kind not in ("epsilon", "v_prediction"):
        raise CheckpointError(
            f"{sched_cfg['_class_name']} with prediction_type={kind!r} is not supported (epsilon, v_prediction)"
        )
    net = DiffusersNet(_load_model(model_dir, model_cfg), null_class=null_class)
    teacher = EDMDenoiserTeacher(
        net,
        sigma_data=float(sched_cfg.get("sigma_data", 0.5)),
        data_shape=net.data_shape,
        num_classes=net.num_classes,
        sigma_min=float(sched_cfg.get("sigma_min", 0.002)),
        sigma_max=float(sched_cfg.get("sigma_max", 80.0)),
        prediction=kind,
    ).eval()
    description = {
        "kind": "diffusers",
        "source": str(path),
        "name": Path(path).resolve().name,
        "model": model_cfg["_class_name"],
        "scheduler": sched_cfg["_class_name"],
        "scheduler_config": scheduler_summary(sched_cfg),
        "prediction": "x0",
        "diffusers_prediction": f"EDM preconditioning ({kind}, sigma_data {teacher.sigma_data:g})",
        "path": teacher.path.name,
        "data_shape": list(net.data_shape),
        "num_classes": net.num_classes,
        "null_class": net.has_null,
        "notes": [],
    }
    return teacher, description


def attach_prompt_encoder(teacher: DiffusersTeacher, description: dict, path: str | Path) -> None:
    """A text-conditioned model in a pipeline folder with tokenizer/ and text_encoder/: ``teacher.prompt_encoder``
    (referenced, ``flowmap.text``) and the empty prompt's ``TextCondition`` as the teacher's null condition (CFG)."""
    from flowmap.text import PromptEncoder, find_text_encoder

    if teacher.net.cond_kind != "text" or not find_text_encoder(path):
        return
    encoder = PromptEncoder.from_folder(path)
    object.__setattr__(teacher, "prompt_encoder", encoder)
    object.__setattr__(teacher, "null_condition", encoder.null())
    description["text"] = encoder.reference()


def attach_codec(teacher: DiffusersTeacher, description: dict, path: str | Path) -> None:
    """A pipeline folder with ``vae/``: the teacher's data is the VAE's scaled latent (``flowmap.latent``); the
    codec is referenced as ``teacher.codec`` (not a submodule: not in the teacher's state or device moves) and
    recorded in the description's ``latent`` entry."""
    from flowmap.latent import LatentCodec, find_vae

    if find_vae(path) is None:
        return
    codec = LatentCodec.from_folder(path)
    shape = tuple(teacher.net.data_shape)
    if codec.latent_channels != shape[0]:
        raise CheckpointError(
            f"{path}: the VAE has {codec.latent_channels} latent channels, the model takes {shape[0]}"
        )
    object.__setattr__(teacher, "codec", codec)
    description["latent"] = codec.reference(shape)


def ddim_time_grid(scheduler, teacher: DiffusersTeacher) -> Tensor:
    """Our linear-axis times (K + 1,) of a diffusers ``DDIMScheduler`` after ``set_timesteps``, float64, decreasing:
    Euler on this grid is diffusers' DDIM (eta 0). Raises for a spacing whose steps are not one grid
    (``linspace``); ``teachers.diffusers_sampler`` has the general plan and sampler."""
    from teachers.diffusers_sampler import ddim_plan

    if not isinstance(teacher.path, DiscreteVPPath):
        raise ValueError("ddim_time_grid needs a teacher on a discrete VP schedule")
    config = {**dict(scheduler.config), "_class_name": "DDIMScheduler"}
    return ddim_plan(teacher, scheduler.num_inference_steps, config).grid()
