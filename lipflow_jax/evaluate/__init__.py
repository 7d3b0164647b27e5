"""Evaluation: metrics (geometry error, masked MSE, PSNR, SSIM), method runners, figures, the
report and its uncertainty (bootstrap intervals, paired comparisons, verdicts)."""

from lipflow_jax.evaluate.evaluation import (
  MethodOutput,
  eval_settings,
  evaluate_codes,
  geometry_errors,
  load_eval_set,
  observations,
  render_frames,
  run_method,
  select_frames,
  summarize,
  take,
  timed_call,
)
from lipflow_jax.evaluate.figures import draw_keypoints, grid, save_gif, save_png, to_uint8
from lipflow_jax.evaluate.metrics import (
  gaussian_window,
  geometry_error,
  image_metrics,
  masked_mse,
  mse_to_psnr,
  psnr,
  ssim,
  ssim_map,
)
from lipflow_jax.evaluate.report import (
  INPUTS,
  METHODS,
  ROW_KEYS,
  claim_summary,
  comparisons_table,
  make_row,
  markdown_table,
  read_report,
  verdicts,
  write_report,
)
from lipflow_jax.evaluate.samples import (
  conditional_samples_figure,
  prior_samples,
  random_samples_figure,
  render_codes,
)
from lipflow_jax.evaluate.stats import (
  bootstrap_ci,
  compare,
  comparison_pairs,
  paired_comparison,
  verdict,
)
