"""What a repo's tags and classes say it is.

The pipeline tags of chat and vision-language models, and the tasks, libraries, model types and architectures
this project does not serve, each with the name a refusal gives it.
"""

from __future__ import annotations

import re

VISION_PIPELINES = frozenset(
    {
        "image-text-to-text",
        "any-to-any",
        "visual-question-answering",
        "image-to-text",
        "video-text-to-text",
        "audio-text-to-text",
        "document-question-answering",
    }
)
TEXT_PIPELINES = frozenset({"text-generation", "text2text-generation", "conversational"})
UNSUPPORTED_PIPELINES: dict[str, str] = {
    "automatic-speech-recognition": "speech recognition",
    "text-to-speech": "speech synthesis",
    "text-to-audio": "audio generation",
    "audio-to-audio": "audio processing",
    "audio-classification": "audio classification",
    "voice-activity-detection": "voice activity detection",
    "feature-extraction": "embeddings",
    "sentence-similarity": "embeddings",
    "text-ranking": "reranking",
    "fill-mask": "masked-language modelling (an encoder)",
    "text-classification": "text classification",
    "token-classification": "token classification",
    "zero-shot-classification": "zero-shot classification",
    "question-answering": "extractive question answering",
    "text-to-image": "image generation",
    "image-to-image": "image generation",
    "unconditional-image-generation": "image generation",
    "text-to-video": "video generation",
    "image-to-video": "video generation",
    "text-to-3d": "3D generation",
    "image-classification": "image classification",
    "object-detection": "object detection",
    "image-segmentation": "image segmentation",
    "depth-estimation": "depth estimation",
    "mask-generation": "mask generation",
    "zero-shot-image-classification": "zero-shot image classification",
    "image-feature-extraction": "image embeddings",
}
UNSUPPORTED_LIBRARIES: dict[str, str] = {
    "diffusers": "image generation (diffusers)",
    "sentence-transformers": "embeddings (sentence-transformers)",
    "gguf": "GGUF weights (llama.cpp)",
    "open_clip": "CLIP embeddings",
    "timm": "image classification (timm)",
    "speechbrain": "speech (speechbrain)",
    "nemo": "speech (NeMo)",
    "pyannote-audio": "speech (pyannote)",
    "whisperkit": "speech recognition (WhisperKit)",
}
UNSUPPORTED_MODEL_TYPES: dict[str, str] = {
    **dict.fromkeys(
        [
            "whisper",
            "wav2vec2",
            "hubert",
            "wavlm",
            "speecht5",
            "seamless_m4t",
            "bark",
            "encodec",
            "musicgen",
            "data2vec-audio",
            "unispeech",
            "sew",
        ],
        "speech/audio",
    ),
    **dict.fromkeys(
        [
            "bert",
            "roberta",
            "xlm-roberta",
            "distilbert",
            "mpnet",
            "nomic_bert",
            "deberta",
            "deberta-v2",
            "electra",
            "albert",
            "camembert",
            "modernbert",
            "new",
        ],
        "an encoder (embeddings/classification)",
    ),
    **dict.fromkeys(["clip", "siglip", "dinov2", "vit"], "a vision encoder (embeddings/classification)"),
    **dict.fromkeys(
        ["colpali", "colqwen2", "colqwen2_5", "colidefics3", "colsmol"], "document retrieval embeddings"
    ),
    **dict.fromkeys(
        ["sam", "sam2", "sam3", "sam_hq", "segformer", "mask2former", "maskformer", "oneformer", "upernet"],
        "image segmentation",
    ),
}
# Architecture classes that are no text generator, by what they are: the config alone says so even when
# the repo's tags and README are gone. ColPali-style retrievers (`ColQwen2`, `ColQwen3_5`, `ColSmol`) wrap a
# VLM's config (vision section and all) but produce embeddings.
_NON_CHAT_ARCH: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"For(Semantic|Instance|Universal|Image|Panoptic)?Segmentation$"), "image segmentation"),
    (re.compile(r"ForMaskGeneration$"), "mask generation"),
    (re.compile(r"^Col[A-Z]|ForRetrieval$|Retriever$"), "document retrieval embeddings"),
    (re.compile(r"ForEmbedding$|EmbeddingModel$|ForTextEmbedding$"), "embeddings"),
    (re.compile(r"Reward(Model)?$|ForRewardModel(ing)?$|ForProcessReward$"), "a reward model"),
    (re.compile(r"For(Sequence|Token|Image|Audio|Video)Classification$"), "classification"),
    (re.compile(r"ForMaskedLM$|ForQuestionAnswering$|ForMultipleChoice$"), "an encoder task"),
    (re.compile(r"ForObjectDetection$"), "object detection"),
    (re.compile(r"ForDepthEstimation$"), "depth estimation"),
    (re.compile(r"ForSpeechSeq2Seq$|ForCTC$|ForTextToSpeech$"), "speech"),
)
