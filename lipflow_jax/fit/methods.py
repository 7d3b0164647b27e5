"""The methods of the comparison, in one table: how each one gets a latent code from an
inference-time signal.

  method                    model                 codes       prior (fitted)        initialisation
  dam_fit                   dam                   fit         gaussian (N(0, I))    zeros
  dam_regressor             dam                   regressor
  direct_encoder            direct_<input>        direct
  lipflow_prior_mode        lipflow               prior_mode
  lipflow_fit               lipflow               fit         lipflow               prior_mode
  conditional_gaussian_fit  conditional_gaussian  fit         conditional_gaussian  prior_mode
  mean_mesh                 mean                  mean

"model" is the trained model decoding the codes (a key of the main job's bundles; ``<input>`` is
'keypoints' or 'hmc'); "codes" is how the codes are made: fitted with ``fit_latents``, the
DAM-Regressor's output, the direct encoder's output, or the prior's mode without optimisation.
``mean_mesh`` reads no input: the training-mean mesh and texture (``bundle.mean_bundle``, whose
decoder returns the normalisation means for any code), the score of "no information".
"""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class Method:
  """One row of the table above (``prior`` and ``init`` only for fitted methods)."""

  name: str
  model: str
  codes: str
  prior: Optional[str] = None
  init: Optional[str] = None

  @property
  def fitted(self) -> bool:
    return self.codes == "fit"

  def model_for(self, input: str) -> str:  # pylint: disable=redefined-builtin
    """The trained model whose decoder reads this method's codes for ``input``."""
    return self.model.format(input=input)


METHODS = {
  m.name: m
  for m in (
    Method("dam_fit", model="dam", codes="fit", prior="gaussian", init="zeros"),
    Method("dam_regressor", model="dam", codes="regressor"),
    Method("direct_encoder", model="direct_{input}", codes="direct"),
    Method("lipflow_prior_mode", model="lipflow", codes="prior_mode"),
    Method("lipflow_fit", model="lipflow", codes="fit", prior="lipflow", init="prior_mode"),
    Method(
      "conditional_gaussian_fit",
      model="conditional_gaussian",
      codes="fit",
      prior="conditional_gaussian",
      init="prior_mode",
    ),
    Method("mean_mesh", model="mean", codes="mean"),
  )
}

FITTED = tuple(name for name, m in METHODS.items() if m.fitted)
INPUTS = ("keypoints", "hmc")
