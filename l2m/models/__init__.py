"""Model zoo: GPT-2, Mamba and Mamba2 backbones with discrete or Gaussian token adapters.

    model = build_model(cfg, io={"kind": "gaussian", "dim": 64}, max_seq_len=1024)

``cfg`` is a preset from conf/model/*.yaml (or any mapping with the same keys), or a typed config
(GPTConfig, MambaConfig, Mamba2Config). New architectures plug in with `register_architecture`.
"""

from l2m.models.checkpoint import Checkpoint, UnreadableCheckpointError, load_checkpoint, load_pretrained, read_checkpoint
from l2m.models.config import MixerConfig, ModelConfig
from l2m.models.gpt import GPT, GPTConfig
from l2m.models.mamba import Mamba, MambaConfig
from l2m.models.mamba2 import Mamba2, Mamba2Config
from l2m.models.mixer_stack import MixerStack
from l2m.models.registry import ARCHITECTURES, build_model, model_config, register_architecture
from l2m.models.sequence_model import SequenceModel

__all__ = [
    "ARCHITECTURES", "Checkpoint", "GPT", "load_pretrained", "GPTConfig", "Mamba", "Mamba2", "Mamba2Config", "MambaConfig",
    "MixerConfig", "MixerStack", "ModelConfig", "SequenceModel", "UnreadableCheckpointError", "build_model",
    "load_checkpoint", "model_config", "read_checkpoint", "register_architecture",
]
