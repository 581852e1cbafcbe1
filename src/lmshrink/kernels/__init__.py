"""lmshrink.kernels"""
