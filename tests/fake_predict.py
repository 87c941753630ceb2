"""launch/predict.py with a stand-in model (score = mean brightness of the 32-px grey image, map = that
value everywhere, threshold 0.5), so tests of its inputs and outputs need no trained run. Same flags."""
import sys

import numpy as np
from absl import app

from launch import predict
from mediclip_jax.evaluate.normalization import Normalization


def score(images):
  maps = np.repeat(images.mean((1, 2))[:, None, None], 32, 1).repeat(32, 2)  # bright image, hot map
  return maps.astype(np.float32), maps.max((1, 2))


predict.jax_model = lambda workdir: predict.Model(32, "grey", 2, Normalization(0.0, 0.5), score)
app.run(lambda argv: sys.exit(predict.main(argv)))
