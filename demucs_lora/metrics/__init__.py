"""Scores of separated stems against references (training, test and benchmarks share them)."""
from demucs_lora.metrics.scores import (
    ALL_METRICS, EXTRA_METRICS, METRICS, MRSTFT_RESOLUTIONS, a_weighting_fir,
    aura_mrstft, aura_stft, bleed_full, bleedless, check_metrics, fullness, l1_freq,
    l1_freq_score, log_wmse_filter, mel_filterbank, neg_log_wmse, nsdr, sdr, si_sdr,
    summarize, track_metrics)

__all__ = [
    'ALL_METRICS', 'EXTRA_METRICS', 'METRICS', 'MRSTFT_RESOLUTIONS', 'a_weighting_fir',
    'aura_mrstft', 'aura_stft', 'bleed_full', 'bleedless', 'check_metrics', 'fullness',
    'l1_freq', 'l1_freq_score', 'log_wmse_filter', 'mel_filterbank', 'neg_log_wmse',
    'nsdr', 'sdr', 'si_sdr', 'summarize', 'track_metrics']
