"""Built-in models, by name, and models from anywhere by ``"module:factory"``.

``build("resnet20")`` gives a CIFAR ResNet-20 (32x32 inputs, 10 classes); ``build("pkg.mod:make_net")``
imports ``pkg.mod`` and calls ``make_net(num_classes=..., **kwargs)``; ``build("torchvision:resnet18")`` and
``build("timm:resnet18")`` use those libraries when they are installed.
"""
import importlib
from typing import TYPE_CHECKING, Callable, Dict, List

if TYPE_CHECKING:
    from torch import nn

# Built-in factories by name, as (module of this package, function): imported on first use, so that the names
# (the CLI's --help, its checks) cost no torch import.
_BUILTIN: Dict[str, tuple] = {
    "resnet20": ("resnet_cifar", "resnet20"),
    "resnet56": ("resnet_cifar", "resnet56"),
    "vgg16": ("vgg", "vgg16"),
    "mobilenetv2": ("mobilenetv2", "mobilenetv2"),
    "resnet50": ("resnet50", "resnet50"),
    "concatnet": ("concatnet", "concatnet"),
}
_CLASSES = {"CifarResNet": "resnet_cifar", "VGG": "vgg", "MobileNetV2": "mobilenetv2", "ResNet50": "resnet50",
            "ConcatNet": "concatnet"}

# Input shape (C, H, W) each built-in model expects.
INPUT_SHAPES = {name: (3, 32, 32) for name in _BUILTIN}
INPUT_SHAPES["resnet50"] = (3, 224, 224)


def __getattr__(name):  # the factories and classes (``models.resnet20``, ``models.CifarResNet``), on first use
    module = _BUILTIN[name][0] if name in _BUILTIN else _CLASSES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


def available() -> List[str]:
    """Names of the built-in models."""
    return sorted(_BUILTIN)


def _resolve(name: str) -> Callable[..., "nn.Module"]:
    if name in _BUILTIN:
        return __getattr__(name)
    if ":" not in name:
        raise ValueError(
            f"unknown model {name!r}: expected one of {available()} or 'module:factory' (e.g. torchvision:resnet18)"
        )
    module_name, factory_name = name.split(":", 1)
    if module_name == "torchvision":
        module_name = "torchvision.models"
    if module_name == "timm":
        try:
            timm = importlib.import_module("timm")
        except ImportError as exc:
            raise ValueError(f"model {name!r} needs timm, which is not installed") from exc
        if not timm.is_model(factory_name):  # create_model would raise a bare RuntimeError
            raise ValueError(f"model {name!r}: timm has no model {factory_name!r} (see timm.list_models())")
        return lambda **kw: timm.create_model(factory_name, **kw)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"model {name!r}: cannot import module {module_name!r} ({exc})") from exc
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise ValueError(f"model {name!r}: module {module_name!r} has no callable {factory_name!r}")
    return factory


def build(name: str, num_classes: int = 10, **kwargs) -> "nn.Module":
    """Build a model by built-in name (see :func:`available`) or ``"module:factory"``.

    ``num_classes`` and ``kwargs`` (e.g. ``width=0.5`` for the built-ins) are passed to the factory. The
    model comes randomly initialised, in training mode.
    """
    from torch import nn

    if not isinstance(name, str) or not name:
        raise TypeError(f"model name must be a non-empty string, got {name!r}")
    model = _resolve(name)(num_classes=num_classes, **kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model factory {name!r} returned {type(model).__name__}, not an nn.Module")
    return model


__all__ = [
    "available",
    "build",
    "INPUT_SHAPES",
    "resnet20",
    "resnet56",
    "vgg16",
    "mobilenetv2",
    "resnet50",
    "concatnet",
    "CifarResNet",
    "VGG",
    "MobileNetV2",
    "ResNet50",
    "ConcatNet",
]
