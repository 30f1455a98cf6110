"""Model zoo: small reference models to train N:M sparse, built for a data set's shape.

    from nmsparse.app.models import create_model, list_models
    model = create_model("resnet20", input_shape=(3, 32, 32), num_classes=10, width=0.5)
    lm = create_model("gpt_tiny", input_shape=(256,), num_classes=256,
                      task="language_model")

``list_models()`` maps each registered name to its :class:`ModelInfo` (description, tasks,
options with defaults). ``create_model`` also takes ``"package.module:factory"`` to build
a user model, and ``@register_model`` adds one under a name. Such a name read back from a
file (a run, a recipe) is imported only when trusted: see :mod:`nmsparse.app.models.trust`.

Registered: ``mlp``; CIFAR ResNets ``resnet20/32/56`` (option-B shortcuts); ImageNet
ResNets ``resnet18/34/50`` (3x3 stem without max-pool below 64 px); ``vit_tiny``;
byte-level ``gpt_tiny`` and the ``gpt_1b`` preset (language modelling; greedy decoding with
a static KV cache through ``GPT.decoder``, see :class:`StaticKVDecoder`).

Importing this package loads torch and the model definitions only.
"""

# The built-in model modules register their factories when imported.
from . import frequency, gpt, mlp, resnet, resnet_cifar, spvit, vit  # noqa: F401
from ._registry import TASKS, ModelInfo, create_model, list_models, register_model
from .gpt import GPT, StaticKVDecoder, gpt_param_count

__all__ = ["GPT", "TASKS", "ModelInfo", "StaticKVDecoder", "create_model", "gpt_param_count",
           "list_models", "register_model"]
