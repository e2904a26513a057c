"""Face detection and alignment shared by FaceRestorer and FocalCropper.

MediaPipe's BlazeFace ships its weights inside the wheel, so detection works offline on any machine; RetinaFace
(facexlib) is used instead when its weights are configured. Alignment maps four landmarks (eyes, nose, mouth
centre) onto the FFHQ 512x512 template the restorers were trained on; paste-back inverts that warp with a
feathered mask, as facexlib does.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass

import cv2
import numpy as np

logger = logging.getLogger(__name__)

# FFHQ template at 512x512: image-left eye, image-right eye, nose tip, mouth centre.
FFHQ_TEMPLATE = np.array(
    [[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935], [257.17511, 371.28081]], dtype=np.float32
)


@dataclass(frozen=True)
class Face:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels
    landmarks: np.ndarray  # 4x2: image-left eye, image-right eye, nose tip, mouth centre
    score: float

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2


def distinct(faces: list[Face], max_iou: float = 0.3) -> list[Face]:
    """The most confident face first, and no face twice: a detection whose box overlaps a more confident one's
    (IoU above ``max_iou``) or whose centre lies inside it is the same face found again (MediaPipe's full-range
    model returns such pairs; each would be aligned and restored in turn, restoring that face twice)."""
    kept: list[Face] = []
    for face in sorted(faces, key=lambda f: -f.score):
        cx, cy = face.centre
        if not any(_iou(face.box, k.box) > max_iou or (k.box[0] <= cx <= k.box[2] and k.box[1] <= cy <= k.box[3])
                   for k in kept):
            kept.append(face)
    return kept


def _iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class MediaPipeDetector:
    """BlazeFace full-range model; thread-safe (MediaPipe graphs are not)."""

    def __init__(self, min_confidence: float = 0.5) -> None:
        import mediapipe as mp

        self._detector = mp.solutions.face_detection.FaceDetection(
            model_selection=1, min_detection_confidence=min_confidence
        )
        self._lock = threading.Lock()

    def detect(self, rgb: np.ndarray) -> list[Face]:
        """Every face, most confident first (see ``distinct``)."""
        height, width = rgb.shape[:2]
        with self._lock:
            result = self._detector.process(np.ascontiguousarray(rgb))
        faces = []
        for detection in result.detections or []:
            rel = detection.location_data.relative_bounding_box
            x0, y0 = max(0.0, rel.xmin * width), max(0.0, rel.ymin * height)
            x1, y1 = min(width, (rel.xmin + rel.width) * width), min(height, (rel.ymin + rel.height) * height)
            points = np.array([[k.x * width, k.y * height] for k in detection.location_data.relative_keypoints])
            # MediaPipe order: subject's right eye (image left), left eye, nose tip, mouth centre, ears.
            faces.append(Face((x0, y0, x1, y1), points[:4].astype(np.float32), float(detection.score[0])))
        return distinct(faces)


class RetinaFaceDetector:
    """facexlib's RetinaFace (ResNet-50 or MobileNet-0.25, told apart by the weights), from safetensors."""

    def __init__(self, weights: str, device, min_confidence: float = 0.5, max_faces: int = 16) -> None:
        from facexlib.detection.retinaface import RetinaFace
        from safetensors.torch import load_file

        from deployments.weights.loader import check_safetensors, resolve

        path = resolve(weights)
        check_safetensors(path)
        state = {k.removeprefix("module."): v for k, v in load_file(path).items()}
        network = "mobile0.25" if any(k.startswith("body.stage1.") for k in state) else "resnet50"
        self.model = RetinaFace(network_name=network, half=False, device=device)
        self.model.load_state_dict(state, strict=True)
        self.model.eval().to(device)
        self.min_confidence = min_confidence
        self.max_faces = max_faces

    def detect(self, rgb: np.ndarray) -> list[Face]:
        import torch

        with torch.inference_mode():
            boxes = self.model.detect_faces(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), self.min_confidence)
        faces = []
        for row in boxes:
            five = np.asarray(row[5:15], dtype=np.float32).reshape(5, 2)
            four = np.stack([five[0], five[1], five[2], (five[3] + five[4]) / 2])
            x0, y0, x1, y1 = (float(v) for v in row[:4])
            faces.append(Face((x0, y0, x1, y1), four, float(row[4])))
        return distinct(faces)[: self.max_faces]


def align(rgb: np.ndarray, face: Face, size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Warp the face onto the template; returns the crop and the 2x3 affine matrix used."""
    template = FFHQ_TEMPLATE * (size / 512.0)
    matrix, _ = cv2.estimateAffinePartial2D(face.landmarks, template, method=cv2.LMEDS)
    if matrix is None:
        raise ValueError("landmarks are degenerate")
    crop = cv2.warpAffine(rgb, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)
    return crop, matrix


def paste_back(rgb: np.ndarray, restored: np.ndarray, matrix: np.ndarray, blend: float = 1.0) -> np.ndarray:
    """Warp a restored face back and blend it in with a feathered mask; pixels outside the mask are untouched."""
    height, width = rgb.shape[:2]
    inverse = cv2.invertAffineTransform(matrix)
    warped = cv2.warpAffine(restored, inverse, (width, height), flags=cv2.INTER_LINEAR)
    size = restored.shape[0]
    mask = cv2.warpAffine(np.ones((size, size), np.float32), inverse, (width, height), flags=cv2.INTER_NEAREST)
    # Feather over a few percent of the crop's size in the image (at least 3 px, so small faces get a ramp too).
    # The warp's outermost pixel is mixed with its black border, so the mask is eroded by the blur's reach plus
    # that pixel: the blurred alpha then ramps smoothly from exactly 0 at the crop's edge, and never lets the
    # border in. (Cutting the blur off at the eroded edge instead left a 0 -> 0.5 step: a seam around the face.)
    scale = np.sqrt(abs(np.linalg.det(inverse[:, :2])))
    sigma = max(3, round(size * scale * 0.04)) / 2
    reach = math.ceil(3 * sigma)  # the Gaussian's tail beyond 3 sigma is below a grey level
    mask = cv2.erode(mask, np.ones((2 * reach + 3, 2 * reach + 3), np.uint8))
    mask = cv2.GaussianBlur(mask, (2 * reach + 1, 2 * reach + 1), sigmaX=sigma)
    alpha = (mask * blend)[..., None]
    out = rgb.astype(np.float32) * (1 - alpha) + warped.astype(np.float32) * alpha
    result = np.clip(out.round(), 0, 255).astype(np.uint8)
    untouched = alpha[..., 0] == 0
    result[untouched] = rgb[untouched]  # exact, whatever the float arithmetic did
    return result
