"""tokensieve.demos"""
