"""lmshrink.report"""
