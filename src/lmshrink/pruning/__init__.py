"""lmshrink.pruning"""
