"""Building blocks shared by the vision encoders, the resampler, the xattn blocks and the LMs."""
