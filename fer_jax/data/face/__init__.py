"""Face detection (MTCNN, Zhang et al. 2016) and eye-level alignment for FER data preparation."""

from fer_jax.data.face.align import align_face, alignment_matrix
from fer_jax.data.face.mtcnn import (
    Face,
    FaceDetector,
    detect_faces,
    load_mtcnn_params,
    to_rgb_uint8,
)

__all__ = [
    "Face",
    "FaceDetector",
    "align_face",
    "alignment_matrix",
    "detect_faces",
    "load_mtcnn_params",
    "to_rgb_uint8",
]
