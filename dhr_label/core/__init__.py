"""Pure array code of DHR: OT, resampling, CAP and heat maps, the CRF wrapper, the three steps."""
