"""Five-point face alignment onto the PD-FGC crop template (similarity transform, bicubic warp to 224x224)."""

from __future__ import annotations

import torch
from kornia.geometry.transform import warp_affine

CROP_SIZE = 224

# Left pupil, right pupil, nose tip, left mouth corner, right mouth corner ("left" = image left), as fractions
# of the crop side. These are the points the published encoder was trained with.
TEMPLATE_FRACTIONS = (
    (0.3843, 0.27),
    (0.62, 0.2668),
    (0.503, 0.4185),
    (0.406, 0.5273),
    (0.5977, 0.525),
)


def template_points(size: int = CROP_SIZE, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """The 5 template points in crop pixels, [5, 2] (x, y)."""
    return torch.tensor(TEMPLATE_FRACTIONS, dtype=dtype, device=device) * size


def umeyama_similarity(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity (rotation, uniform scale, translation) mapping `source` onto `target`.

    source: [B, N, 2], target: [N, 2] or [B, N, 2]. Returns [B, 2, 3] such that target ~ A @ [x, y, 1].
    Umeyama (1991): the sign correction keeps the result a proper rotation even when the best orthogonal fit
    would be a reflection. Solved in float64 for stability, returned in the source dtype.
    """
    if source.ndim != 3 or source.shape[-1] != 2:
        raise ValueError(f"source points must have shape [B, N, 2], got {list(source.shape)}")
    if target.ndim == 2:
        target = target.unsqueeze(0).expand(source.shape[0], -1, -1)
    if target.shape != source.shape:
        raise ValueError(f"target points {list(target.shape)} do not match source points {list(source.shape)}")
    if source.shape[1] < 2:
        raise ValueError("a similarity needs at least 2 point pairs")
    src = source.to(torch.float64)
    dst = target.to(device=source.device, dtype=torch.float64)
    src_mean, dst_mean = src.mean(dim=1, keepdim=True), dst.mean(dim=1, keepdim=True)
    src_centered, dst_centered = src - src_mean, dst - dst_mean
    covariance = dst_centered.transpose(1, 2) @ src_centered / src.shape[1]  # [B, 2, 2]
    u, singular, vh = torch.linalg.svd(covariance)
    signs = torch.ones_like(singular)
    signs[:, -1] = torch.sign(torch.linalg.det(u) * torch.linalg.det(vh))
    signs[signs == 0] = 1.0
    rotation = u @ torch.diag_embed(signs) @ vh
    source_variance = src_centered.pow(2).sum(dim=2).mean(dim=1)  # [B]
    if bool((source_variance <= 0).any()):
        raise ValueError("degenerate face points: all 5 points coincide, cannot estimate a similarity")
    scale = (singular * signs).sum(dim=1) / source_variance
    linear = scale[:, None, None] * rotation
    translation = dst_mean.transpose(1, 2) - linear @ src_mean.transpose(1, 2)  # [B, 2, 1]
    return torch.cat([linear, translation], dim=2).to(source.dtype)


def similarity_to_template(points: torch.Tensor, size: int = CROP_SIZE) -> torch.Tensor:
    """Frame-pixel face points [B, 5, 2] -> [B, 2, 3] affine matrices from frame pixels to crop pixels."""
    if points.ndim != 3 or tuple(points.shape[1:]) != (5, 2):
        raise ValueError(
            f"points must have shape [B, 5, 2] (left pupil, right pupil, nose tip, left and right mouth corner), "
            f"got {list(points.shape)}"
        )
    if not points.is_floating_point():
        points = points.float()
    if not bool(torch.isfinite(points).all()):
        raise ValueError("points contain NaN or infinite values; fill frames without a face before aligning")
    return umeyama_similarity(points, template_points(size, points.dtype, points.device))


def apply_affine(points: torch.Tensor, transforms: torch.Tensor) -> torch.Tensor:
    """Map points [B, N, 2] through affine matrices [B, 2, 3]."""
    return points @ transforms[:, :, :2].transpose(1, 2) + transforms[:, :, 2].unsqueeze(1)


def align_face_crops(frames: torch.Tensor, transforms: torch.Tensor, size: int = CROP_SIZE) -> torch.Tensor:
    """Warp frames [B, H, W, 3] in [0, 1] (IMAGE layout) to crops [B, 3, size, size] in [-1, 1].

    Bicubic, black outside the frame (as the encoder saw in training), values clamped like 8-bit output would be.
    Runs on the frames' device.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must have shape [B, H, W, 3] RGB, got {list(frames.shape)}")
    if transforms.ndim != 3 or tuple(transforms.shape[1:]) != (2, 3) or transforms.shape[0] != frames.shape[0]:
        raise ValueError(
            f"transforms must have shape [{frames.shape[0]}, 2, 3] (one per frame), got {list(transforms.shape)}"
        )
    if not frames.is_floating_point():
        raise ValueError(f"frames must be floating point in [0, 1], got dtype {frames.dtype}")
    # Interpolate in at least float32: half precision bicubic loses visible detail.
    work_dtype = torch.promote_types(frames.dtype, torch.float32)
    images = frames.permute(0, 3, 1, 2).to(work_dtype)
    matrices = transforms.to(device=frames.device, dtype=work_dtype)
    warped = warp_affine(images, matrices, (size, size), mode="bicubic", padding_mode="zeros", align_corners=True)
    return warped.clamp(0.0, 1.0) * 2.0 - 1.0


# Bicubic interpolation reads up to 2 pixels beyond a sample position; one more for rounding.
WARP_SUPPORT_MARGIN = 3


def warp_source_regions(transforms: torch.Tensor, height: int, width: int, size: int = CROP_SIZE) -> torch.Tensor:
    """Frame regions [B, 4] (x0, y0, x1, y1, integer, clamped to the frame) that a warp to `size` reads.

    The crop square mapped back into the frame, widened by the bicubic support. Cutting frames to these regions
    before warping gives the same crops for a fraction of the memory when the face is small in a large frame.
    """
    linear, translation = transforms[:, :, :2].to(torch.float64), transforms[:, :, 2:].to(torch.float64)
    corners = torch.tensor([[0, 0], [size - 1, 0], [0, size - 1], [size - 1, size - 1]], dtype=torch.float64,
                           device=transforms.device)
    # Frame point of crop point c: inverse(linear) @ (c - translation).
    source = torch.linalg.solve(linear.unsqueeze(1), (corners.unsqueeze(0).unsqueeze(-1) - translation.unsqueeze(1)))
    source = source.squeeze(-1)  # [B, 4 corners, 2]
    low = (source.amin(dim=1) - WARP_SUPPORT_MARGIN).floor()
    high = (source.amax(dim=1) + WARP_SUPPORT_MARGIN).ceil() + 1
    limits = torch.tensor([width, height], dtype=torch.float64, device=transforms.device)
    low = torch.minimum(low.clamp(min=0), limits - 1)
    high = torch.maximum(torch.minimum(high, limits), low + 1)
    return torch.cat([low, high], dim=1).to(torch.int64)


def cut_warp_regions(frames: torch.Tensor, transforms: torch.Tensor,
                     size: int = CROP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut frames [B, H, W, C] (any dtype) to what the warp reads -> (regions [B, h, w, C], shifted transforms).

    Regions of one batch are zero-padded to a common size (beyond the read area, so the crops are unchanged).
    """
    regions = warp_source_regions(transforms, frames.shape[1], frames.shape[2], size).tolist()
    cut_height = max(y1 - y0 for _, y0, _, y1 in regions)
    cut_width = max(x1 - x0 for x0, _, x1, _ in regions)
    cut = frames.new_zeros((frames.shape[0], cut_height, cut_width, frames.shape[3]))
    for index, (x0, y0, x1, y1) in enumerate(regions):
        cut[index, : y1 - y0, : x1 - x0] = frames[index, y0:y1, x0:x1]
    offsets = torch.tensor([[x0, y0] for x0, y0, _, _ in regions], dtype=transforms.dtype, device=transforms.device)
    shifted = transforms.clone()
    # A(p) = L p + t with p = p' + offset  =>  t' = t + L @ offset.
    shifted[:, :, 2] += (transforms[:, :, :2] @ offsets.unsqueeze(-1)).squeeze(-1)
    return cut, shifted
