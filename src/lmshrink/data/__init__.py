"""lmshrink.data"""
