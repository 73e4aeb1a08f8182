"""Conditioning: expression features to emotion tokens (portrait encoder, per-window token split), the
emotion attention (NFEB), and saved prompt conditioning."""
