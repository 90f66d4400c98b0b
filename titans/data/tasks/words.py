"""Small word lists (written for this project) for needle keys and word values."""

ADJECTIVES = tuple("""
able bald bitter black blue bold brave brief bright broad busy calm cheap clean clear clever
close cold cool crisp curly damp dark dear deep dense dry dull eager early easy empty even
faint fair false fancy fast fierce fine firm flat fond fresh full gentle giant glad golden
good grand great green grey happy hard heavy high hollow huge humble icy idle jolly keen
kind large late lazy light little lively long loud lucky mad merry mild modern narrow neat
new nice noble odd old pale plain polite poor proud pure quick quiet rapid rare raw real
red rich ripe rough round royal rude rural sad safe sharp shiny short shy silent silly
simple slow small smart smooth soft solid sour spare steep stiff still strange strict
strong sunny super sweet swift tall tame thick thin tidy tiny tough true ugly vast warm
weak wet white wide wild wise witty young""".split())

NOUNS = tuple("""
acorn anchor apple arrow badge bagel ballad banjo barrel basket beacon bell bicycle blanket
boat bottle bracelet bridge bucket button cabin cactus camera candle canoe canvas carpet
castle cello chair cherry chimney circle clock cloud comet compass cookie copper cottage
crayon crown cushion daisy desert diamond dolphin dragon drum eagle engine feather fiddle
forest fountain garden garnet glacier globe guitar hammer harbor helmet honey island jacket
jigsaw kettle kitten ladder lantern lemon lighthouse magnet mango marble meadow mirror
mountain needle noodle oasis orange otter paddle parrot pebble pencil pepper piano pillow
planet pocket puzzle quartz rabbit rainbow river rocket saddle sailboat scarf shell
shovel silver spoon statue teapot thimble thunder tiger trumpet tulip tunnel turtle
umbrella valley velvet violin wagon walnut whistle window zebra""".split())
