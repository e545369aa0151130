"""Build CvT-13 and classify a generated image: no download, no arguments."""

import numpy as np
import torch

import torchcvt

torch.manual_seed(0)
model = torchcvt.create_model("cvt-13").eval()  # random weights: the point is the pipeline, not the answer
y, x = np.mgrid[0:300, 0:400]
image = np.stack([(x % 64) * 4, (y % 48) * 5, (x + y) % 256], axis=-1).astype(np.float32) / 255.0
mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
pixels = torch.from_numpy(((image[:224, :224] - mean) / std).transpose(2, 0, 1)).float()[None]
with torch.no_grad():
    probs = model(pixels).softmax(-1)[0]
top = probs.topk(5)
print("top-5 of an untrained CvT-13 on a generated 224x224 image:")
for score, index in zip(top.values.tolist(), top.indices.tolist()):
    print(f"  class {index:4d}  {score:.4f}")
