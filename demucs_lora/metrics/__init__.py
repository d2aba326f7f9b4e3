"""Scores of separated stems against references (training, test and benchmarks share them).

`separation` (nSDR, SI-SDR, BSSEval SDR), `spectral` (L1-freq, bleedless, fullness),
`library_matched` (log-WMSE, auraloss STFT losses, as their libraries compute them),
`tracks` (metric names, one track's table, the average over tracks).
"""
from demucs_lora.metrics.library_matched import (
    MRSTFT_RESOLUTIONS, a_weighting_fir, aura_mrstft, aura_stft, log_wmse_filter, neg_log_wmse)
from demucs_lora.metrics.separation import nsdr, sdr, si_sdr
from demucs_lora.metrics.spectral import (bleed_full, bleedless, fullness, l1_freq, l1_freq_score,
                                          mel_filterbank)
from demucs_lora.metrics.tracks import (ALL_METRICS, EXTRA_METRICS, METRICS, check_metrics,
                                        summarize, track_metrics)

__all__ = [
    'ALL_METRICS', 'EXTRA_METRICS', 'METRICS', 'MRSTFT_RESOLUTIONS', 'a_weighting_fir',
    'aura_mrstft', 'aura_stft', 'bleed_full', 'bleedless', 'check_metrics', 'fullness',
    'l1_freq', 'l1_freq_score', 'log_wmse_filter', 'mel_filterbank', 'neg_log_wmse',
    'nsdr', 'sdr', 'si_sdr', 'summarize', 'track_metrics']
