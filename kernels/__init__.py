"""tokensieve.kernels"""
