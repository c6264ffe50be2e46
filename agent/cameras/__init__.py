"""Camera backends: one Protocol (`base`), a simulator and a depthai 2.x implementation."""
