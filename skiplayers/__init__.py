"""skiplayers"""
