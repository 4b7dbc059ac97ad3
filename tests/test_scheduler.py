"""The sampling schedule against DiffSynth-Studio's FLUX schedule: literal numbers worked out from its formula
(reference notes, diffsynth_flux.md section 8), and DiffSynth's own FlowMatchScheduler (diffsynth 2.1.12)."""
import importlib.util
from pathlib import Path

import pytest
import torch

from flux_core.scheduler import add_noise, euler_step, flux_sigmas, next_sigmas

# DiffSynth's FLUX schedule (FlowMatchScheduler("FLUX.1").set_timesteps_flux):
#   sigma_min = 0.003 / 1.002, sigma_start = sigma_min + (1 - sigma_min) * strength,
#   sigma_i = linspace(sigma_start, sigma_min, N)[i], shifted: s * sigma / (1 + (s - 1) * sigma), s = 3.
# Worked out by hand for N = 30, s = 3:
#   strength 1: the linspace step is (1 - sigma_min) / 29 = 0.0343795168...;
#     sigma_0 = 1                    -> 3 / 3 = 1
#     sigma_1 = 1 - step = 0.96562048 -> 2.89686145 / 2.93124097 = 0.98827134
#     sigma_2 = 0.93124097            -> 2.79372290 / 2.86248193 = 0.97597923
#     sigma_3 = 0.89686145            -> 2.69058435 / 2.79372290 = 0.96308204
#     sigma_29 = sigma_min            -> 0.009 / 1.008 = 1/112 = 0.00892857
#   strength 0.6: sigma_start = 0.6 + 0.4 * sigma_min = 0.60119760 -> 1.80359281 / 2.20239521 = 0.81892333;
#     step (0.60119760 - sigma_min) / 29 = 0.02062909; sigma_1 = 0.58056851 -> 0.80592181
FIRST_SIGMAS_30 = [1.0, 0.98827134, 0.97597923, 0.96308204]
LAST_SIGMA = 1 / 112
FIRST_SIGMAS_30_STRENGTH_06 = [0.81892333, 0.80592181]
# N = 4, strength 0.6, s = 3: linspace(0.60119760, sigma_min, 4) = 0.60119760, 0.40179641, 0.20239521, 0.00299401
#   -> 1.80359281 / 2.20239521, 1.20538922 / 1.80359281, 0.60718563 / 1.40479042, 0.009 / 1.008
SIGMAS_4_STRENGTH_06 = [0.81892333, 0.66832669, 0.43222506, 0.00892857]
# The unshifted schedule's sigma_1 is 0.96562; the shift moves it by 0.0227, so 1e-6 catches a missing shift, a
# shift of 3.1 instead of 3 (7e-4) and N+1 points instead of N (1e-3). Measured <= 2.5e-8 against the literal
# numbers (float32 sigmas), <= 1.2e-7 against DiffSynth's scheduler.
TOLERANCE = 1e-6


def diffsynth_scheduler():
    """DiffSynth's FlowMatchScheduler, from its own file. Importing the `diffsynth` package runs its data loaders'
    imports (torchvision, imageio: not installed here), so the module file, which needs only torch and numpy, is
    loaded on its own. Skipped where diffsynth is not installed (`pip install --no-deps diffsynth==2.1.12`); the
    literal-number tests above run everywhere."""
    spec = importlib.util.find_spec("diffsynth")
    if spec is None:
        pytest.skip("diffsynth is not installed (pip install --no-deps diffsynth==2.1.12)")
    path = Path(spec.submodule_search_locations[0]) / "diffusion" / "flow_match.py"
    module_spec = importlib.util.spec_from_file_location("diffsynth_flow_match", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.FlowMatchScheduler("FLUX.1")


def test_first_sigmas_of_30_steps_shift_3_are_diffsynths_literal_numbers():
    s = flux_sigmas(30, 1.0, 3.0)
    assert s.shape == (30,) and s.dtype == torch.float32
    assert torch.allclose(s[:4].double(), torch.tensor(FIRST_SIGMAS_30, dtype=torch.float64), atol=TOLERANCE, rtol=0)
    assert abs(float(s[-1]) - LAST_SIGMA) < TOLERANCE
    assert torch.equal(flux_sigmas(30), s)   # shift None means 3


def test_strength_below_one_rebuilds_the_schedule_from_a_lower_start():
    s = flux_sigmas(30, 0.6, 3.0)
    assert torch.allclose(s[:2].double(), torch.tensor(FIRST_SIGMAS_30_STRENGTH_06, dtype=torch.float64),
                          atol=TOLERANCE, rtol=0)
    assert s.shape == (30,) and abs(float(s[-1]) - LAST_SIGMA) < TOLERANCE   # all 30 steps, same end


def test_four_steps_at_strength_0_6_are_the_literal_numbers():
    s = flux_sigmas(4, 0.6, 3.0)
    assert torch.allclose(s.double(), torch.tensor(SIGMAS_4_STRENGTH_06, dtype=torch.float64), atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("steps, strength, shift", [(4, 0.6, 3.0), (30, 1.0, 3.0), (30, 0.6, 3.0), (4, 0.2, None), (20, 0.75, 1.5),
                                                    (1, 1.0, 3.0), (50, 1.0, 7.0)])
def test_sigmas_match_diffsynths_flow_match_scheduler(steps, strength, shift):
    scheduler = diffsynth_scheduler()
    scheduler.set_timesteps(steps, denoising_strength=strength, shift=shift)
    ours = flux_sigmas(steps, strength, shift)
    # DiffSynth builds its linspace in float32, ours in float64 before rounding: measured max difference 1.2e-7
    # (one float32 ulp near 1); the smallest real mistake, sigma_min = 0.003 instead of 0.003/1.002, moves 1.8e-5.
    assert ours.shape == scheduler.sigmas.shape
    assert (ours - scheduler.sigmas).abs().max() < TOLERANCE


def test_euler_steps_and_noising_match_diffsynths_scheduler():
    scheduler = diffsynth_scheduler()
    scheduler.set_timesteps(5, denoising_strength=0.8, shift=3.0)
    sigmas = flux_sigmas(5, 0.8, 3.0)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 16, 4, 4, generator=g), torch.randn(1, 16, 4, 4, generator=g)
    ours = add_noise(x0, noise, float(sigmas[0]))
    theirs = scheduler.add_noise(x0, noise, scheduler.timesteps[0])
    # Measured 3.6e-7 (float32); noising at the second sigma (0.82) instead of the first (0.92) moves it by
    # 0.10 * |noise - x0| (order 0.1 or more), the variance-preserving formula by order 1.
    assert (ours - theirs).abs().max() < 1e-6
    nexts = next_sigmas(sigmas)
    for i, t in enumerate(scheduler.timesteps):
        v = torch.randn(1, 16, 4, 4, generator=g)
        ours = euler_step(ours, v, float(sigmas[i]), float(nexts[i]))
        theirs = scheduler.step(v, t, theirs)
    # Measured 7.2e-7 after 5 float32 steps. The last step goes to sigma 0 in both; a step that stopped at the
    # last sigma would leave ~0.009 * |v| (order 1e-2).
    assert (ours - theirs).abs().max() < 1e-5
