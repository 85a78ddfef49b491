"""Live mode: real drafter/verifier models running Multi-SPIN rounds."""
