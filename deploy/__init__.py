"""Device artifacts: offline-optimized graphs (`compile`) and verified bundles (`pack`)."""
