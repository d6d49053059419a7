"""Generation: sampling, the native decoding step and its kernels, speculative decoding, quantised layers, chat."""
