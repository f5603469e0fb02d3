"""tokensieve.eval"""
