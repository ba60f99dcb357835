"""The presets: the paper's recipe scaled to smaller images, datasets and machines.

Each preset is a flat mapping of config fields (names unique across the config's sections) that
:func:`pirl.config.from_preset` applies over the paper's defaults; ``imagenet-r50`` changes
nothing.  Kept apart from :mod:`pirl.config` so the typed fields and their checks read on their
own; this module imports nothing from the config.
"""

from __future__ import annotations

from typing import Any

from pirl.errors import ConfigError


def view_preset(image_size: int) -> dict[str, Any]:
    """View numbers for a given image size (docs/method.md, "Views": crop ~ 255/224 x size,
    cell = crop / 3, patch ~ cell x 64 / 85, evaluation resize ~ 256/224 x size).  The paper's
    numbers at 224:

    | size | jigsaw crop | cell | patch | eval resize |
    |------|-------------|------|-------|-------------|
    | 224  | 255         | 85   | 64    | 256         |
    | 96   | 108         | 36   | 27    | 110         |
    | 64   | 72          | 24   | 18    | 73          |
    | 32   | 36          | 12   | 9     | 36          |
    """
    table = {
        # size: (jigsaw_crop, cell, patch, eval_resize)
        224: (255, 85, 64, 256),
        96: (108, 36, 27, 110),
        64: (72, 24, 18, 73),
        32: (36, 12, 9, 36),
    }
    if image_size not in table:
        raise ConfigError(f"views.image_size={image_size}: no view preset; choose one of "
                          f"{sorted(table)} or set jigsaw_crop/cell/patch explicitly")
    crop, cell, patch, resize = table[image_size]
    return {"image_size": image_size, "jigsaw_crop": crop, "cell": cell, "patch": patch,
            "eval_resize": resize}


def preset_overrides() -> dict[str, dict[str, Any]]:
    """Preset name -> the config fields it sets (a fresh dict on every call)."""
    small_opt = {"warmup_epochs": 2.0}
    return {
        # The paper: ResNet-50, 224 px, batch 1024 over 32 GPUs, 800 epochs, N = 32,000.
        "imagenet-r50": {},
        # PIRL-c2x: the same recipe on a ResNet-50 twice as wide in every stage (~94M trunk
        # parameters, 4096-d res5).  Its heads stay the paper's linear f and g; model.head=mlp
        # gives the authors' later release's MLP heads.
        "imagenet-r50w2": {"width": 2},
        "imagenette96-r18": {
            **view_preset(96), "arch": "resnet18", "epochs": 100, "batch_size": 256,
            "num_negatives": 4096, **small_opt,
        },
        "tiny64-r18": {
            **view_preset(64), "arch": "resnet18", "epochs": 100, "batch_size": 256,
            "num_negatives": 4096, **small_opt,
        },
        "cifar10-r18": {
            **view_preset(32), "arch": "resnet18", "small_stem": True, "image_scale_min": 0.2,
            "epochs": 200, "batch_size": 256, "num_negatives": 4096, **small_opt,
        },
        # The quality benchmark's budget (benchmarks/quality.py, docs/quality.md): Imagenette at
        # 32 px through the ImageNet stem, a few epochs on 2 shared CPU cores.  What mattered at
        # this scale (measured in docs/quality.md): the paper's lr (0.03 per 256 images; higher
        # lr lost to random init) and a weaker colour jitter without grayscale (the paper's
        # strength removes the colour cues a short run has no time to replace).
        "imagenette-small": {
            **view_preset(32), "arch": "resnet18", "epochs": 12, "batch_size": 32,
            "warmup_epochs": 0.5, "num_negatives": 4096, "brightness": 0.2, "contrast": 0.2,
            "saturation": 0.2, "hue": 0.05, "grayscale_prob": 0.0, "workers": 1,
        },
        # The offline demo: the built-in synthetic dataset, small enough for 2 CPU cores.  Colour
        # is a nuisance there, so the colour jitter is strong (any hue, grayscale 1 in 5): the
        # run must learn the shapes to tell images apart.  Crops keep at least half the image
        # (the shape).  Chosen by benchmarks/demo_search.py (docs/demo.md); 16 epochs rather
        # than 12 because the shorter run's lead over random init fell to a few points on some
        # processors (float rounding moves a run like another seed would; docs/demo.md).
        "demo": {
            **view_preset(32), "arch": "resnet18", "image_scale_min": 0.5, "epochs": 16,
            "batch_size": 32, "num_negatives": 1024, "warmup_epochs": 0.5, "workers": 1,
            "brightness": 0.4, "contrast": 0.4, "saturation": 0.4, "hue": 0.5,
            "grayscale_prob": 0.2, "log_every": 10, "knn_k": 20, "knn_every": 2,
        },
    }


PRESETS: tuple[str, ...] = tuple(preset_overrides())


# views.photometric_ops: the names it takes, and the authors' release's list (VISSL's
# ImgPilRandomPhotometric, applied with probability 0.66 after the colour jitter).
PHOTO_OP_NAMES = ("posterize", "sharpness", "solarize", "autocontrast", "equalize")
RELEASE_PHOTO_OPS = ("posterize", "sharpness", "solarize", "autocontrast")


def photo_ops(spec: str) -> tuple[str, ...]:
    """``views.photometric_ops`` -> the operations in the order applied: ``""`` none (the paper
    preset), ``"release"`` the authors' release's four, otherwise comma-separated names of
    :data:`PHOTO_OP_NAMES` (each at most once).  Raises ConfigError naming the key."""
    if spec.strip() == "release":
        return RELEASE_PHOTO_OPS
    names = tuple(n.strip() for n in spec.split(",") if n.strip())
    bad = [n for n in names if n not in PHOTO_OP_NAMES]
    if bad or len(set(names)) != len(names):
        raise ConfigError(f"views.photometric_ops={spec!r}: expected 'release' or distinct "
                          f"comma-separated names of {list(PHOTO_OP_NAMES)}")
    return names

