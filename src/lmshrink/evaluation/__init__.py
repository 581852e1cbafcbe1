"""lmshrink.evaluation"""
