"""A plain, step-by-step statement of the published face pipeline, for checking the flashportrait backend.

It follows the published procedure literally: OpenCV's own matrix helpers (cv2.getRotationMatrix2D,
cv2.invertAffineTransform, cv2.transform, cv2.warpPerspective with a 3x3 resize matrix), SciPy's softmax, the
per-region smoothing written out region by region, and the two tracking passes run one after the other over the
whole video (the first over all frames, the second over the frames where the first found a face), each running
the detector itself. It shares no code with the backend; it runs the same ONNX files in its own sessions.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import onnxruntime
from scipy.special import softmax


class Oracle:
    def __init__(self, detector_path, landmark_path) -> None:
        self.det = onnxruntime.InferenceSession(str(detector_path), providers=["CPUExecutionProvider"])
        self.lmk = onnxruntime.InferenceSession(str(landmark_path), providers=["CPUExecutionProvider"])
        self.nan_on_still = True  # the published arithmetic; see smooth()

    # -- the detector -------------------------------------------------------------------------------------------

    @staticmethod
    def resize_matrix(width, height):
        centre = np.eye(3)
        centre[0, 2], centre[1, 2] = -width / 2, -height / 2
        ratio = 272 / height if width / height < 160 / 272 else 160 / width
        scale = np.diag([ratio, ratio, 1.0])
        move = np.eye(3)
        move[0, 2], move[1, 2] = 0.5 * 160, 0.5 * 272
        return move @ scale @ centre

    def detector_input(self, bgr):
        matrix = self.resize_matrix(bgr.shape[1], bgr.shape[0])
        resized = cv2.warpPerspective(bgr, matrix, dsize=(160, 272))
        mean = np.array([103.53, 116.28, 123.675], dtype=np.float32).reshape(1, 1, 3) / 255
        std = np.array([57.375, 57.12, 58.395], dtype=np.float32).reshape(1, 1, 3) / 255
        values = (resized.astype(np.float32) / 255 - mean) / std
        return np.expand_dims(np.transpose(values, [2, 0, 1]), 0), matrix

    def detect(self, bgr):
        """Integer boxes [N, 4] and scores [N] in frame pixels, best first."""
        values, matrix = self.detector_input(bgr)
        outputs = self.det.run(None, {self.det.get_inputs()[0].name: values})
        scores = [np.squeeze(x) for x in outputs[:3]]
        raw = [np.squeeze(x) for x in outputs[3:]]
        all_boxes, all_scores = [], []
        for stride, distribution, score in zip([8, 16, 32], raw, scores):
            columns, rows = np.meshgrid(np.arange(160 / stride), np.arange(272 / stride))
            x, y = columns.flatten() * stride, rows.flatten() * stride
            centre = np.stack((x, y, x, y), axis=1)
            distances = softmax(distribution.reshape((-1, 8)), axis=1)
            distances = np.sum(distances * np.arange(8)[None], axis=1).reshape((-1, 4)) * stride
            all_boxes.append(centre + np.array([-1, -1, 1, 1]) * distances)
            all_scores.append(score)
        boxes, probs = np.concatenate(all_boxes), np.concatenate(all_scores)
        mask = probs > 0.4
        boxes, probs = boxes[mask], probs[mask]
        picked = []
        order = list(np.argsort(probs, kind="stable")[-200:])
        while order:
            current = order.pop()
            picked.append(current)
            rest = []
            for other in order:
                if self.iou(boxes[other], boxes[current], 1e-5) <= 0.3:
                    rest.append(other)
            order = rest
        boxes, probs = boxes[picked], probs[picked]
        inverse = np.linalg.inv(matrix)
        height, width = bgr.shape[:2]
        mapped = []
        for x0, y0, x1, y1 in boxes:
            corners = np.array([[x0, y0, 1], [x1, y1, 1], [x0, y1, 1], [x1, y0, 1]]) @ inverse.T
            corners = corners[:, :2] / corners[:, 2:]
            left, right = np.clip([corners[:, 0].min(), corners[:, 0].max()], 0, width)
            top, bottom = np.clip([corners[:, 1].min(), corners[:, 1].max()], 0, height)
            mapped.append([left, top, right, bottom])
        return np.array(mapped, dtype=np.float32).reshape(-1, 4).astype(np.int32), probs

    @staticmethod
    def iou(a, b, epsilon=0.0):
        width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = width * height
        area_a = max(0.0, a[2] - a[0]) * max(0.0, a[3] - a[1])
        area_b = max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])
        return inter / (area_a + area_b - inter + epsilon)

    # -- the landmark model -------------------------------------------------------------------------------------

    def run_landmarks(self, crop):
        values = crop.transpose((2, 0, 1)).astype(np.float32)[np.newaxis] / 255.0
        names = [output.name for output in self.lmk.get_outputs()]
        landmark, euler, prob = self.lmk.run(names, {self.lmk.get_inputs()[0].name: values})
        landmark = np.reshape(landmark[0], (2, -1)).transpose((1, 0)) * 128
        roll = math.atan2(landmark[96][1] - landmark[74][1], landmark[96][0] - landmark[74][0] + 1e-8)
        return landmark, (float(euler[0, 0]), float(euler[0, 1]), roll), float(np.ravel(prob)[0])

    @staticmethod
    def box_crop(box):
        x0, y0, x1, y1 = (float(v) for v in box)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        scale = 128 / max(x1 - x0, y1 - y0) * 0.85
        matrix = cv2.getRotationMatrix2D((cx, cy), 0.0, scale)
        matrix[:, 2] += [64 - cx, 64 - cy]
        return matrix

    @staticmethod
    def points_crop(points, angle):
        cx = (points[:, 0].min() + points[:, 0].max()) / 2
        cy = (points[:, 1].min() + points[:, 1].max()) / 2
        turned = Oracle.transform(points, cv2.getRotationMatrix2D((cx, cy), angle, 1.0))
        scale = 128 / max(np.ptp(turned[:, 0]), np.ptp(turned[:, 1])) * 0.85
        matrix = cv2.getRotationMatrix2D((cx, cy), angle, scale)
        placed = Oracle.transform(points, matrix)
        matrix[:, 2] += [64 - (placed[:, 0].min() + placed[:, 0].max()) / 2,
                         64 - (placed[:, 1].min() + placed[:, 1].max()) / 2]
        return matrix

    @staticmethod
    def transform(points, matrix, invert=False):
        if invert:
            matrix = cv2.invertAffineTransform(matrix)
        return np.squeeze(cv2.transform(np.asarray(points, np.float64)[:, None, :], matrix), axis=1)

    def align(self, bgr, box=None, previous=None, iterations=3):
        """(landmarks [222, 2] in frame pixels, (pitch, yaw, roll), score, the crop matrices used)."""
        if previous is not None:
            angle = math.degrees(math.atan2(previous[96][1] - previous[74][1],
                                            previous[96][0] - previous[74][0] + 1e-8))
            matrix = self.points_crop(previous, angle)
        else:
            matrix = self.box_crop(box)
        matrices = [matrix]
        landmarks, euler, prob = self.run_landmarks(cv2.warpAffine(bgr, matrix, (128, 128)))
        landmarks = self.transform(landmarks, matrix, invert=True)
        for _ in range(iterations - 1):
            matrix = self.points_crop(landmarks, math.degrees(euler[2]))
            matrices.append(matrix)
            landmarks, euler, prob = self.run_landmarks(cv2.warpAffine(bgr, matrix, (128, 128)))
            landmarks = self.transform(landmarks, matrix, invert=True)
        return landmarks, euler, prob, matrices

    # -- smoothing ----------------------------------------------------------------------------------------------

    class Filter:
        def __init__(self):
            self.dx_prev = 0.0

        def __call__(self, x, x_prev, t_e, beta, nan_on_still=True):
            if t_e == 0 and not nan_on_still:
                return x_prev.copy()  # only for the test of the backend's guard (see its module)
            with np.errstate(divide="ignore", invalid="ignore"):
                r = 2 * math.pi * 1.0 * t_e
                a_d = r / (r + 1)
                dx = (x - x_prev) / t_e
                dx_hat = a_d * dx + (1 - a_d) * self.dx_prev
                cutoff = 1.0 + beta * np.abs(dx_hat)
                r = 2 * math.pi * cutoff * t_e
                a = r / (r + 1)
                self.dx_prev = dx_hat
                return a * x + (1 - a) * x_prev

    class Smoother:
        # (points, measured points, low threshold, high threshold, low setting, high setting)
        REGIONS = [
            (range(0, 33), range(9, 24), 0.005, 0.02, 0.05, 0.3),
            (range(33, 48), range(33, 48), 0.003, 0.02, 0.03, 0.7),
            (range(48, 74), range(48, 74), 0.003, 0.02, 0.02, 0.5),
            (range(74, 96), range(74, 96), 0.003, 0.02, 0.03, 0.7),
            (range(96, 118), range(96, 118), 0.003, 0.02, 0.03, 0.7),
            (range(118, 182), range(118, 182), 0.003, 0.02, 0.05, 0.7),
            (range(182, 202), range(182, 202), 0.003, 0.02, 0.03, 0.7),
            (range(202, 222), range(202, 222), 0.003, 0.02, 0.03, 0.7),
        ]

        def __init__(self, nan_on_still=True):
            self.prev = None
            self.filters = [Oracle.Filter() for _ in self.REGIONS]
            self.nan_on_still = nan_on_still

        def smooth(self, new, face_dis):
            if self.prev is None:
                self.prev = new.copy()
                return new
            dis = np.sqrt(np.square(new[:, 0] - self.prev[:, 0]) + np.square(new[:, 1] - self.prev[:, 1])) / face_dis
            out = new.copy()
            for (points, measured, low, high, low_value, high_value), region_filter in zip(self.REGIONS, self.filters):
                points, measured = list(points), list(measured)
                motion = np.mean(dis[measured])
                if motion < low:
                    value = low_value * (motion / low)
                elif motion < high:
                    value = low_value + (high_value - low_value) * ((motion - low) / (high - low))
                else:
                    value = high_value
                out[points] = region_filter(new[points], self.prev[points], value, value, self.nan_on_still)
            self.prev = out
            return out

    # -- tracking -----------------------------------------------------------------------------------------------

    def new_face(self, rect):
        return {"rect": rect, "pre": None, "dis": math.sqrt((rect[2] - rect[0]) ** 2 + (rect[3] - rect[1]) ** 2),
                "smoother": Oracle.Smoother(self.nan_on_still)}

    def forward(self, faces, bgr, pre_rect=None):
        if len(faces) == 0 and pre_rect is not None:
            faces.append(self.new_face(pre_rect))
        else:
            for rect in self.detect(bgr)[0]:
                faces.append(self.new_face(rect))
        delete = []
        for index, face in enumerate(faces):
            if face["pre"] is not None:
                landmarks, euler, prob, _ = self.align(bgr, previous=face["pre"])
            else:
                landmarks, euler, prob, _ = self.align(bgr, box=face["rect"])
            if prob < 0.0001:
                if index not in delete:
                    delete.append(index)
                continue
            final = face["smoother"].smooth(landmarks, face["dis"])
            face["pre"] = final
            x_min, x_max, y_min, y_max = final[:, 0].min(), final[:, 0].max(), final[:, 1].min(), final[:, 1].max()
            face["rect"] = [x_min, y_min, x_max, y_max]
            dis = np.linalg.norm(final[0] - final[32])
            if x_max - x_min < 96 or y_max - y_min < 96:
                if index not in delete:
                    delete.append(index)
            pitch, yaw = math.degrees(euler[0]), math.degrees(euler[1])
            face["dis"] = dis * (1.0 + (abs(pitch) + abs(yaw) * 0.6) / 18.0)
        if len(faces) > 1:
            for index, target in enumerate(faces):
                if index in delete:
                    continue
                for other_index, other in enumerate(faces):
                    if other_index in delete or other_index == index:
                        continue
                    if self.iou(target["rect"], other["rect"]) > 0.12:
                        area_target = (target["rect"][3] - target["rect"][1]) * (target["rect"][2] - target["rect"][0])
                        area_other = (other["rect"][3] - other["rect"][1]) * (other["rect"][2] - other["rect"][0])
                        if area_target - area_other < 0:
                            if index not in delete:
                                delete.append(index)
                        elif other_index not in delete:
                            delete.append(other_index)
        for offset, index in enumerate(sorted(delete)):
            faces.pop(index - offset)
        return faces

    @staticmethod
    def largest(faces):
        return sorted(faces, key=lambda f: (f["rect"][2] - f["rect"][0]) * (f["rect"][3] - f["rect"][1]))[-1]

    def det_landmarks(self, frames_bgr):
        """(indices of the frames kept, their landmarks [K, 222, 2], the first pass's rects)."""
        faces, rects, kept = [], [], []
        for index, frame in enumerate(frames_bgr):
            found = self.forward(faces, frame)
            if found:
                rects.append(self.largest(found)["rect"])
                kept.append(index)
        faces, saved, landmarks = [], [], []
        for index, rect in zip(kept, rects):
            found = self.forward(faces, frames_bgr[index], pre_rect=rect)
            if found:
                saved.append(index)
                landmarks.append(self.largest(found)["pre"])
        return saved, np.array(landmarks).reshape(-1, 222, 2), rects
