"""transformers' own Qwen2.5-VL processor, the peer our processor and benchmarks are held against.

Used by the parity tests (tests/hf_reference.py) and by benchmarks that run transformers-based peers
(`pr1.bench.trl_grpo`); it needs transformers (and torch for the model, not for this loader).
"""

from __future__ import annotations


def load_hf_processor(path):
    """`transformers.AutoProcessor.from_pretrained(path)`, also where torchvision is missing.

    Why a helper: in transformers 5.23 `Qwen2_5_VLProcessor` always loads a video processor through
    `AutoVideoProcessor`, and every video processor (`BaseVideoProcessor`, `Qwen2VLVideoProcessor`)
    requires torchvision; no video_preprocessor_config.json / processor_config.json content avoids that
    (the only other route, `auto_map`, is remote code). Without torchvision, for the duration of this
    call only, `AutoVideoProcessor` is swapped for one returning a stub that rejects videos, and
    `VideoProcessorMixin` is exposed on the `transformers` module so the processor's class check on its
    sub-processors accepts the stub (transformers only exports it with torchvision). Everything else
    (processor class, tokenizer, chat_template.jinja, the PIL image processor `Qwen2VLImageProcessorPil`)
    resolves as `AutoProcessor` does it. This project feeds images only, so the stub is never called.
    """
    import importlib

    import transformers
    from transformers import processing_utils
    from transformers.utils import is_torchvision_available
    from transformers.video_processing_utils import VideoProcessorMixin

    if is_torchvision_available():
        return transformers.AutoProcessor.from_pretrained(path)

    class ImagesOnlyVideoProcessor(VideoProcessorMixin):
        merge_size = 2
        temporal_patch_size = 2
        patch_size = 14

        def preprocess(self, videos, **kwargs):
            raise NotImplementedError(
                "video inputs need torchvision (Qwen2VLVideoProcessor); this processor was "
                "loaded by tests.hf_reference.load_hf_processor without it"
            )

    class ImagesOnlyAutoVideoProcessor:
        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            return ImagesOnlyVideoProcessor()

    # The real module: transformers.models.auto's lazy attribute is a placeholder without torchvision.
    video_processing_auto = importlib.import_module("transformers.models.auto.video_processing_auto")
    saved_auto = video_processing_auto.__dict__["AutoVideoProcessor"]
    # The module object the class check reads (processing_utils re-imports transformers, which can leave
    # it distinct from the `transformers` bound above).
    top = processing_utils.transformers_module
    had_mixin = "VideoProcessorMixin" in vars(top)
    video_processing_auto.AutoVideoProcessor = ImagesOnlyAutoVideoProcessor
    if not had_mixin:
        top.VideoProcessorMixin = VideoProcessorMixin
    try:
        return transformers.AutoProcessor.from_pretrained(path)
    finally:
        video_processing_auto.AutoVideoProcessor = saved_auto
        if not had_mixin:
            del top.VideoProcessorMixin
